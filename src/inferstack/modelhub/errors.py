"""Errors of the model supply chain; each message names what was wrong and how to fix it."""

from __future__ import annotations


class ModelHubError(Exception):
    """Base class: the CLI prints the message and exits non-zero, never a traceback."""


class BadReference(ModelHubError, ValueError):
    pass


class PackError(ModelHubError):
    pass


class StoreError(ModelHubError):
    pass


class RegistryError(ModelHubError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SigningError(ModelHubError):
    pass


class ModelVerificationError(ModelHubError):
    """The model must not be loaded. `files` names the offending files (relative paths), if any."""

    def __init__(self, message: str, files: list[str] | None = None) -> None:
        super().__init__(message)
        self.files = files or []
