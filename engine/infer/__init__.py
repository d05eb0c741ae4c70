"""Inference: one pipeline builder, validation images, and generation with a LoRA."""
