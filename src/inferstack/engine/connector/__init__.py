"""KV connectors: load/save KV from the tiered KV store, and pull KV from a prefill engine."""
