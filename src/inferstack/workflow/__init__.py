"""Run Dify-format workflows over the inferstack gateway (see docs/workflows.md)."""
