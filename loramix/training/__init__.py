"""Training workflows: data, Trainer plumbing, one LoRA expert, the gate, worker jobs."""
