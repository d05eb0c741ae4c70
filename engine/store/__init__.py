"""Storage: fsspec access with retries and redaction, the commit protocol, safetensors I/O."""
