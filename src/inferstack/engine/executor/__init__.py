"""Executors turn a scheduled batch into sampled tokens: torch (CPU/CUDA) or emulated."""
