"""Per-user LoRA/QLoRA training: config, base models, tokenization and the trainer."""
