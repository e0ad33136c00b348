"""Cluster simulation: hardware and model catalogs, the roofline performance model, and `inferstack sim`,
a discrete-event fleet simulator in virtual time (docs/simulator.md).

The catalogs and the performance model are pure functions over plain data, so the emulated engine
executor and the simulator compute step times from the same code; the simulator also runs the engine's
scheduler and KV cache and the gateway's router as they are.
"""
