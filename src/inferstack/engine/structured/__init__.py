"""Grammar-constrained decoding (docs/structured-outputs.md): grammar specs, the llguidance compiler
(worker pool, cache, deadline) and the per-step token bitmask of the batch."""
