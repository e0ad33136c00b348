"""Model families of the built-in engine: plain-torch decoder-only transformers over a paged KV cache."""
