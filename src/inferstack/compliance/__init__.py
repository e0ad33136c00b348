"""Compliance: tamper-evident audit log, its verification, and the compliance report."""
