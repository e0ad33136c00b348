"""Client-chosen identifiers (request ids, session keys) made safe to log, forward and keep.

A client controls these headers byte for byte: unbounded, they end up in upstream requests, audit
lines, engine ids and in-memory affinity tables (issue: a 1 MB x-request-id went upstream and into
an audit record). Both servers clean them the same way.
"""

from __future__ import annotations

import hashlib
import re

MAX_ID_CHARS = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/=+@-]")


def clean_request_id(value: str | None) -> str | None:
    """A client's id, kept printable and short: it ends up in engine ids, response ids and logs."""
    if not value:
        return None
    return _UNSAFE.sub("_", value[:MAX_ID_CHARS]) or None


def bounded_key(value: str) -> str:
    """A key used only for equality (session affinity): short keys as they are, long ones as their
    digest, so two long keys stay distinct while neither is kept whole in memory."""
    if len(value) <= MAX_ID_CHARS:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
