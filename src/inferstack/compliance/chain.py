"""The hash chain of the audit log: line format, segment naming and verification.

Each line is one JSON object with `seq` (0, 1, 2, ...), `prev` (the previous line's `hash`, or 64 zeros
for the first record ever) and `hash` = SHA-256 (or HMAC-SHA256 with a secret) over the canonical JSON
of the line without `hash`. Changing, inserting, deleting or reordering a line breaks the chain.

Segments: the active file is `audit.jsonl`; rotated ones are `audit-<first seq, 12 digits>.jsonl`.
When retention prunes old segments, a `retention` record in the chain names each pruned segment with
its last seq and hash, so the first surviving line is still anchored to something the chain vouches for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
ACTIVE_NAME = "audit.jsonl"
_SEGMENT_RE = re.compile(r"^audit-(\d{12})\.jsonl$")


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def line_hash(body: dict[str, Any], key: bytes | None) -> str:
    """Hash of one line's fields (everything except `hash`)."""
    data = canonical(body)
    if key:
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def seal(body: dict[str, Any], key: bytes | None) -> bytes:
    """The full JSONL line (with trailing newline) for a body that already carries seq and prev."""
    sealed = dict(body)
    sealed["hash"] = line_hash(body, key)
    return canonical(sealed) + b"\n"


def segment_name(first_seq: int) -> str:
    return f"audit-{first_seq:012d}.jsonl"


def segments(directory: Path) -> list[Path]:
    """All segments in chain order: rotated ones by first seq, then the active file."""
    rotated = sorted(
        (p for p in directory.iterdir() if _SEGMENT_RE.match(p.name)),
        key=lambda p: int(_SEGMENT_RE.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    active = directory / ACTIVE_NAME
    return [*rotated, active] if active.exists() else rotated


@dataclass
class ChainProblem:
    file: str
    line: int
    message: str
    kind: str = "tampered"  # or "torn": an unfinished last line (crash mid-write), not an edit

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class ChainReport:
    """Outcome of verifying a log directory (or a single file)."""

    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str = GENESIS
    segments: list[str] = field(default_factory=list)
    pruned_segments: int = 0
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "segments": self.segments,
            "pruned_segments": self.pruned_segments,
            "problems": [str(p) for p in self.problems],
        }


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        yield from enumerate(f, start=1)


def verify_chain(target: Path, key: bytes | None = None) -> ChainReport:
    """Verify every line of a log directory (all segments, in order) or of one segment file."""
    files = segments(target) if target.is_dir() else [target]
    report = ChainReport(segments=[p.name for p in files])
    prev_hash: str | None = None  # None: the first line's anchor is checked at the end
    prev_seq: int | None = None
    first_prev: str | None = None
    pruned_anchors: dict[int, str] = {}
    for index, path in enumerate(files):
        for lineno, raw in read_lines(path):
            where = (path.name, lineno)
            if not raw.endswith(b"\n"):
                if index == len(files) - 1 and path.name == ACTIVE_NAME:  # nothing can follow it
                    report.problems.append(ChainProblem(
                        *where, "unfinished last line: a write interrupted by a crash (the writer cuts it and "
                        "records a `recovery` line when it next starts), or a cut file", kind="torn"))
                else:
                    report.problems.append(ChainProblem(*where, "truncated line (no newline): cut file"))
                break
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                report.problems.append(ChainProblem(*where, f"not JSON ({e.msg})"))
                return report
            except UnicodeDecodeError as e:  # a changed byte inside a multi-byte character: the writer wrote UTF-8
                report.problems.append(ChainProblem(*where, f"not UTF-8 at byte {e.start} (line edited)"))
                return report
            if not isinstance(rec, dict) or not {"seq", "prev", "hash"} <= rec.keys():
                report.problems.append(ChainProblem(*where, "missing seq/prev/hash fields"))
                return report
            body = {k: v for k, v in rec.items() if k != "hash"}
            expected = line_hash(body, key)
            if not hmac.compare_digest(str(rec["hash"]), expected):
                report.problems.append(ChainProblem(*where, "hash does not match the line's content (line edited)"))
                return report
            seq = rec["seq"]
            if prev_seq is None:
                first_prev = rec["prev"]
                report.first_seq = seq
            else:
                if seq != prev_seq + 1:
                    report.problems.append(
                        ChainProblem(*where, f"seq {seq} follows {prev_seq}: records were deleted or reordered")
                    )
                    return report
                if rec["prev"] != prev_hash:
                    report.problems.append(
                        ChainProblem(*where, "prev does not match the previous line's hash (chain broken)")
                    )
                    return report
            if rec.get("type") == "retention":
                for pruned in rec.get("pruned", []):
                    pruned_anchors[int(pruned["last_seq"])] = str(pruned["last_hash"])
                    report.pruned_segments += 1
            prev_seq, prev_hash = seq, rec["hash"]
            report.records += 1
    report.last_seq = prev_seq
    report.last_hash = prev_hash or GENESIS
    if report.first_seq is not None and target.is_dir():
        _check_anchor(report, files[0].name, first_prev or "", pruned_anchors)
    return report


def _check_anchor(report: ChainReport, first_file: str, first_prev: str, pruned: dict[int, str]) -> None:
    first_seq = report.first_seq or 0
    if first_seq == 0:
        if first_prev != GENESIS:
            report.problems.append(ChainProblem(first_file, 1, "first record does not start from the genesis hash"))
        return
    if pruned.get(first_seq - 1) != first_prev:
        report.problems.append(
            ChainProblem(
                first_file,
                1,
                f"log starts at seq {first_seq} but no retention record vouches for the pruned records before it "
                "(segments were deleted outside retention)",
            )
        )
