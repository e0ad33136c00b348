"""OpenAI-compatible gateway over engine pools: routing, flow control, keys and token budgets."""
