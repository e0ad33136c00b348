"""Cluster simulation building blocks: hardware and model catalogs and the roofline performance model.

Everything here is a pure function over plain data so that the emulated engine executor and the
virtual-time simulator compute step times from the same code.
"""
