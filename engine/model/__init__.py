"""Base models: family detection, loading, and the embedded tiny models."""
