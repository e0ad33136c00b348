"""OCI references: `[oci://]HOST[:PORT]/REPO[:TAG][@sha256:HEX]`, validated like the distribution spec."""

from __future__ import annotations

import re
from dataclasses import dataclass

from inferstack.modelhub.errors import BadReference

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def identifier(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def is_oci(ref: str) -> bool:
    return ref.startswith("oci://")


def parse_reference(ref: str) -> Reference:
    raw = ref.removeprefix("oci://")
    digest = None
    if "@" in raw:
        raw, digest = raw.split("@", 1)
        if not DIGEST_RE.match(digest):
            raise BadReference(f"{ref!r}: digest must look like sha256:<64 hex digits>")
    host, sep, path = raw.partition("/")
    if not sep or not ("." in host or ":" in host or host == "localhost"):
        raise BadReference(
            f"{ref!r}: name the registry host first, e.g. oci://127.0.0.1:5000/models/smollm2:q4_1"
        )
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise BadReference(f"{ref!r}: invalid tag {tag!r} (letters, digits, '_', '.', '-'; at most 128)")
    if not _REPO_RE.match(path):
        raise BadReference(
            f"{ref!r}: invalid repository {path!r} (lowercase letters, digits and . _ - separated by /)"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=host, repository=path, tag=tag, digest=digest)
