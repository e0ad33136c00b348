"""inferstack: an AI inference infrastructure stack."""

__version__ = "0.1.0"
