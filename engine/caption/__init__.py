"""Captioning: giving uncaptioned training images a caption before training.

``backend`` is the contract every captioner keeps; ``local`` runs a vision-language model
through transformers, ``api`` an OpenAI-compatible chat-completions server.
"""
