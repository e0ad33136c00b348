"""Audit log: hash chain, tamper detection, rotation, retention, recovery, async append."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from inferstack.compliance.audit import AuditLog, AuditRecord
from inferstack.compliance.chain import ACTIVE_NAME, segments, verify_chain
from inferstack.compliance.config import AuditConfig


def _cfg(tmp_path: Path, **kw) -> AuditConfig:
    return AuditConfig(directory=tmp_path / "audit", fsync=False, **kw)


def _write(cfg: AuditConfig, n: int, flush_every: int = 0, **kw) -> None:
    with AuditLog(cfg, **kw) as log:
        for i in range(n):
            log.append_nowait(AuditRecord(model="m", status=200, latency_ms=float(i), tenant="t", key_id="k1",
                                          prompt_tokens=i, completion_tokens=1, prompt=f"hello {i}"))
            if flush_every and i % flush_every == 0:
                log.flush()


def _lines(cfg: AuditConfig) -> list[dict]:
    return [json.loads(line) for p in segments(cfg.directory) for line in p.read_text().splitlines()]


def test_records_are_chained_and_prompt_is_off_by_default(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _write(cfg, 5)
    recs = _lines(cfg)
    assert [r["seq"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[0]["prev"] == "0" * 64
    assert all(recs[i]["prev"] == recs[i - 1]["hash"] for i in range(1, 5))
    assert "prompt" not in recs[0] and len(recs[0]["prompt_sha256"]) == 64
    assert {"time", "tenant", "key_id", "model", "status", "latency_ms", "prompt_tokens"} <= recs[0].keys()
    report = verify_chain(cfg.directory)
    assert report.ok and report.records == 5 and report.last_seq == 4


def test_prompt_logged_only_when_enabled(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, log_prompts=True)
    _write(cfg, 1)
    assert _lines(cfg)[0]["prompt"] == "hello 0"


def test_chain_continues_after_restart(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _write(cfg, 3)
    _write(cfg, 2)
    assert [r["seq"] for r in _lines(cfg)] == [0, 1, 2, 3, 4]
    assert verify_chain(cfg.directory).ok


@pytest.mark.parametrize("attack", ["edit", "delete", "swap", "insert", "truncate_tail_line"])
def test_tampering_is_detected_with_file_and_line(tmp_path: Path, attack: str) -> None:
    cfg = _cfg(tmp_path)
    _write(cfg, 6)
    path = cfg.directory / ACTIVE_NAME
    lines = path.read_text().splitlines(keepends=True)
    if attack == "edit":
        lines[2] = lines[2].replace('"status":200', '"status":500')
    elif attack == "delete":
        del lines[3]
    elif attack == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif attack == "insert":
        lines.insert(2, lines[2])
    elif attack == "truncate_tail_line":
        lines[-1] = lines[-1][:-10]
    path.write_text("".join(lines))
    report = verify_chain(cfg.directory)
    assert not report.ok
    assert report.problems[0].file == ACTIVE_NAME
    assert report.problems[0].line in (2, 3, 4, 6)


def test_deleting_the_first_records_is_detected(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _write(cfg, 4)
    path = cfg.directory / ACTIVE_NAME
    path.write_text("".join(path.read_text().splitlines(keepends=True)[2:]))
    report = verify_chain(cfg.directory)
    assert not report.ok and "retention" in report.problems[0].message


def test_rotation_and_retention_keep_the_chain_verifiable(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    cfg = _cfg(tmp_path, rotate_bytes=4096, retention_days=200)
    _write(cfg, 60, flush_every=5, clock=lambda: now[0])
    rotated = [p for p in segments(cfg.directory) if p.name != ACTIVE_NAME]
    assert len(rotated) >= 2
    assert verify_chain(cfg.directory).ok
    # Age the two oldest segments past retention; the next start prunes them and records it.
    for p in rotated[:2]:
        os.utime(p, (now[0] - 201 * 86400, now[0] - 201 * 86400))
    _write(cfg, 1, clock=lambda: now[0])
    remaining = segments(cfg.directory)
    assert rotated[0] not in remaining and rotated[1] not in remaining
    report = verify_chain(cfg.directory)
    assert report.ok, report.problems
    assert report.pruned_segments == 2 and report.first_seq > 0
    # A segment deleted by hand (not through retention) breaks the chain.
    next(p for p in segments(cfg.directory) if p.name != ACTIVE_NAME).unlink()
    assert not verify_chain(cfg.directory).ok


def test_daily_rotation(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    cfg = _cfg(tmp_path)
    with AuditLog(cfg, clock=lambda: now[0]) as log:
        log.event("model.loaded", model="m")
        log.flush()
        now[0] += 86400
        log.event("model.loaded", model="m")
        log.flush()
    assert len(segments(cfg.directory)) == 2
    assert verify_chain(cfg.directory).ok


def test_torn_tail_is_cut_and_recorded(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    _write(cfg, 3)
    path = cfg.directory / ACTIVE_NAME
    with path.open("ab") as f:
        f.write(b'{"seq":3,"par')
    _write(cfg, 1)
    recs = _lines(cfg)
    assert recs[3]["type"] == "recovery" and recs[3]["torn_bytes_removed"] == 13
    assert verify_chain(cfg.directory).ok


def test_hmac_chain_needs_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUDIT_KEY", "s3cret")
    cfg = _cfg(tmp_path, hmac_key_env="AUDIT_KEY")
    _write(cfg, 3)
    assert verify_chain(cfg.directory, key=b"s3cret").ok
    assert not verify_chain(cfg.directory, key=b"other").ok
    assert not verify_chain(cfg.directory).ok


def test_retention_below_six_months_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="183"):
        AuditConfig(directory=tmp_path, retention_days=30)
    assert AuditConfig(directory=tmp_path, retention_days=30, allow_short_retention=True).retention_days == 30
    assert AuditConfig().retention_days >= 183


def test_async_append_with_a_tiny_queue_loses_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, queue_size=2)

    async def main() -> None:
        log = AuditLog(cfg)
        await asyncio.gather(*(log.append(AuditRecord(model="m", status=200, latency_ms=1.0)) for _ in range(200)))
        await log.aclose()

    asyncio.run(main())
    report = verify_chain(cfg.directory)
    assert report.ok and report.records == 200


@settings(max_examples=25, deadline=None)
@given(st.lists(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in {"seq", "prev", "hash"}),
                                st.one_of(st.integers(), st.text(max_size=20), st.none(), st.booleans()),
                                max_size=4), min_size=1, max_size=8),
       st.data())
def test_any_single_byte_flip_breaks_verification(tmp_path_factory, events, data) -> None:
    cfg = _cfg(tmp_path_factory.mktemp("h"))
    with AuditLog(cfg) as log:
        for ev in events:
            log.append_nowait({"type": "x", **ev})
    path = cfg.directory / ACTIVE_NAME
    raw = bytearray(path.read_bytes())
    assert verify_chain(cfg.directory).ok
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = (raw[i] + 1) % 256
    path.write_bytes(bytes(raw))
    assert not verify_chain(cfg.directory).ok


def test_a_byte_that_breaks_utf8_is_reported_not_raised(tmp_path) -> None:
    """Found by the byte-flip property: a flipped byte inside a multi-byte character made `json.loads` raise
    UnicodeDecodeError out of verification instead of reporting the edit."""
    cfg = _cfg(tmp_path)
    with AuditLog(cfg) as log:
        log.append_nowait({"type": "x", "note": "café"})
    path = cfg.directory / ACTIVE_NAME
    raw = bytearray(path.read_bytes())
    i = raw.index("é".encode())
    raw[i + 1] = 0x41   # the second byte of "é" (0xC3 0xA9) is no longer a continuation byte
    path.write_bytes(bytes(raw))
    report = verify_chain(cfg.directory)
    assert not report.ok and "not UTF-8" in str(report.problems[0])
