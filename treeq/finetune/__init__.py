"""QLoRA-style fine-tuning of a quantized model's branches (and step sizes) against full precision."""
