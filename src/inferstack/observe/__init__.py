"""`inferstack observe`: per-request LLM serving metrics for an unmodified server, from eBPF.

bpftrace watches the syscalls that move bytes on the target's accepted TCP sockets (docs/observe.md);
Python rebuilds each HTTP/1.1 exchange and times the SSE chunks of every OpenAI-style request.
"""
