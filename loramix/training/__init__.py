"""Training workflows over the core (`loramix.model`, `loramix.layer`, `loramix.gate`).

data.py     JSON Lines training data: rendering, loss masks, mixing files, padding
trainer.py  TrainingConfig and the Trainer plumbing both trainers share (checkpoints,
            resume, atomic publishing)
expert.py   train_expert: one LoRA expert with peft (LoraSettings)
gate.py     train_gate: the X-LoRA gate over frozen experts (XLoraConfig, GateRegularizer)
jobs.py     independent jobs side by side in worker processes (several experts at once)
"""
