"""Training workflows over the core (`loramix.model`, `loramix.layer`, `loramix.gate`).

data.py     JSON Lines training data: rendering, loss masks, mixing files, padding
jsonl.py    reading JSON Lines files: FILE[:WEIGHT] sources, every bad line in one error
trainer.py  TrainingConfig and the Trainer plumbing both trainers share (checkpoints,
            resume, atomic publishing)
expert.py   train_expert: one LoRA expert with peft (LoraSettings)
gate.py     train_gate: the X-LoRA gate over frozen experts (XLoraConfig, scalings log)
regularizer.py  GateRegularizer: the optional balance and entropy terms on the scalings
jobs.py     independent jobs side by side in worker processes (several experts at once)
"""
