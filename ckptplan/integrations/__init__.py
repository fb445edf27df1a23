"""Use ckptplan from a framework's training loop: ``ckptplan.integrations.transformers`` (Hugging Face).

Each integration imports its framework only when imported itself."""
