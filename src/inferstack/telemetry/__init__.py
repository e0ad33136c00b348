"""Metric definitions (one place for every name we expose), structured logging and tracing helpers."""
