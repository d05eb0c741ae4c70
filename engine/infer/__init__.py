"""Inference: validation images and generation with a LoRA."""
