"""The built-in inference engine: paged KV cache, continuous batching, prefix caching."""
