"""Audit-log settings: the `audit:` section of inferstack.yaml (the lead mounts it there)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# EU AI Act Art. 19(1) and 26(6): logs are kept for at least six months.
MIN_RETENTION_DAYS = 183


class AuditConfig(BaseModel):
    """Where and how the per-request audit log is written."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    directory: Path = Field(Path("audit"), description="Folder holding audit.jsonl and its rotated segments.")
    log_prompts: bool = Field(
        False, description="Store prompt text in records. Off by default: prompts may hold personal data."
    )
    rotate_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="Rotate the active segment above this size.")
    rotate_daily: bool = Field(True, description="Also rotate when the UTC day changes.")
    allow_short_retention: bool = Field(
        False, description="Permit retention_days below 183 (only where other law allows it)."
    )
    retention_days: int = Field(
        MIN_RETENTION_DAYS, description="Rotated segments older than this are pruned (EU AI Act Art. 19: >= 6 months)."
    )
    queue_size: int = Field(10_000, ge=1, description="Records buffered in memory before append() waits.")
    fsync: bool = Field(True, description="fsync after each written batch, so records on disk survive a power loss.")
    on_failure: Literal["refuse", "serve_and_alert"] = Field(
        "refuse",
        description="While the writer cannot write (disk full, I/O error): `refuse` answers 503 so no request "
        "goes unrecorded; `serve_and_alert` keeps serving and only raises the metric and log line. Either way "
        "the writer retries and writes the backlog when it can.",
    )
    retry_max_s: float = Field(
        2.0, gt=0, description="Longest pause between the writer's retries while the disk refuses writes."
    )
    hmac_key_env: str | None = Field(
        None,
        description="Name of an environment variable with a secret; when set, chain hashes are HMAC-SHA256 "
        "so that someone who can edit the file cannot recompute the chain.",
    )

    @field_validator("retention_days")
    @classmethod
    def _eu_minimum(cls, v: int, info: ValidationInfo) -> int:
        if v < 1:
            raise ValueError("retention_days must be at least 1")
        if v < MIN_RETENTION_DAYS and not info.data.get("allow_short_retention"):
            raise ValueError(
                f"retention_days={v} is below the EU AI Act minimum of {MIN_RETENTION_DAYS} days "
                "(Art. 19/26(6)); raise it or set allow_short_retention: true"
            )
        return v
