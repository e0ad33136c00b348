"""KV cache management: prefix hashing, block pool, per-request block tables, KV events."""
