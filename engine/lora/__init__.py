"""LoRA files: weights I/O, formats (diffusers, kohya), metadata, model card, publishing."""
