"""Run a code node's Python in a separate, limited process.

Layers (docs/workflows.md says what each one guarantees):
- kernel: a fresh network namespace (no interfaces but a down loopback) when we may create one
  (root, or unprivileged user namespaces); rlimits on address space, CPU seconds, file size, open files
  and processes; as root, the child runs as user `nobody` in its own session, killed as a group.
- interpreter: `python -I -S` (no site-packages, no environment hooks) and an audit hook that refuses
  sockets, process creation, ctypes and files outside the run directory (sandbox_child.py).
- wall-clock timeout: the whole process group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("sandbox_child.py")
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NOBODY = 65534
# How the kernel says "not now" to a namespace or a process (a per-user count the host has not freed yet,
# memory): the probe waits for these as long as _start_child would (~6 s). Any other answer (EPERM: not
# allowed here; EACCES: `nobody` may not run the interpreter) is this machine's answer for good.
TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EUSERS, errno.EAGAIN, errno.ENOMEM})
PROBE_BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


@dataclass(frozen=True)
class SandboxLimits:
    memory_mb: int = 256
    cpu_s: int = 5
    wall_s: float = 10.0
    file_mb: int = 16
    max_procs: int = 64
    output_kb: int = 1024


class SandboxError(Exception):
    """The code failed, was refused, or went over a limit; the message says which."""


@dataclass(frozen=True)
class Isolation:
    netns_flags: int      # 0: no namespace could be made; the audit hook alone refuses sockets
    drop_to_nobody: bool


@lru_cache(maxsize=1)
def isolation() -> Isolation:
    """The strongest isolation this machine allows, probed once by starting the interpreter with it.

    Root: a network namespace and user `nobody` (if `nobody` can run the interpreter), else a user +
    network namespace (no capabilities over the host: no DAC override, RLIMIT_NPROC applies).
    Not root: a user + network namespace if unprivileged ones are enabled, else the audit hook alone.
    """
    root = os.geteuid() == 0
    tries = [Isolation(CLONE_NEWNET, True)] if root else []
    tries += [Isolation(CLONE_NEWUSER | CLONE_NEWNET, False)]
    refusals = []
    for iso in tries:
        # A busy host can refuse a namespace for a moment (see _start_child): wait that out before
        # settling for a weaker level for the life of the process; a refusal for good moves on at once.
        for delay in (*PROBE_BACKOFF_S, None):
            refused = _refusal(iso)
            if refused is None:
                return iso
            if refused not in TRANSIENT_ERRNOS or delay is None:
                refusals.append(f"{iso}: {errno.errorcode.get(refused, refused)}")
                break
            time.sleep(delay)
    log.warning("code sandbox: no network namespace on this machine (%s); the audit hook alone refuses sockets",
                "; ".join(refusals))
    return Isolation(0, False)


def _refusal(iso: Isolation) -> int | None:
    """None when the interpreter starts with ``iso``; else the errno that refused it (0: none given)."""
    read_fd, write_fd = os.pipe()
    apply = _preexec(SandboxLimits(), iso)

    def preexec() -> None:   # runs in the child before exec and before subprocess closes this fd
        try:
            apply()
        except OSError as exc:
            os.write(write_fd, str(exc.errno or 0).encode())
            raise

    try:
        probe = subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], capture_output=True,
                               preexec_fn=preexec, check=False)
        return None if probe.returncode == 0 else 0
    except subprocess.SubprocessError:   # a pre-exec step was refused; the child wrote its errno
        os.set_blocking(read_fd, False)
        with contextlib.suppress(BlockingIOError, ValueError):
            return int(os.read(read_fd, 32) or b"0")
        return 0
    except OSError as exc:   # fork or exec refused
        return exc.errno or 0
    finally:
        os.close(read_fd)
        os.close(write_fd)


def _unshare(flags: int):
    libc = ctypes.CDLL(None, use_errno=True)

    def apply() -> None:
        if libc.unshare(flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return apply


def _preexec(limits: SandboxLimits, iso: Isolation, report_fd: int | None = None):
    """The child's set-up before exec. A step that fails writes which one and why to ``report_fd``
    (subprocess reports only "Exception occurred in preexec_fn")."""
    unshare = _unshare(iso.netns_flags) if iso.netns_flags else None
    mem = limits.memory_mb << 20
    caps = ((resource.RLIMIT_AS, mem, mem),
            (resource.RLIMIT_CPU, limits.cpu_s, limits.cpu_s + 1),   # SIGXCPU, then KILL
            (resource.RLIMIT_FSIZE, limits.file_mb << 20, limits.file_mb << 20),
            (resource.RLIMIT_NOFILE, 64, 64),
            (resource.RLIMIT_NPROC, limits.max_procs, limits.max_procs),
            (resource.RLIMIT_CORE, 0, 0))

    def rlimits() -> None:
        for which, soft, hard in caps:
            resource.setrlimit(which, (soft, hard))

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    steps: list[tuple[str, Callable[[], None]]] = [("resource limits", rlimits)]
    if unshare:   # first, before dropping root: creating a network namespace needs the capability
        steps.insert(0, ("network namespace (unshare)", unshare))
    if iso.drop_to_nobody:
        steps.append(("dropping to user nobody", drop))

    def apply() -> None:
        for name, step in steps:
            try:
                step()
            except OSError as exc:
                if report_fd is not None:
                    os.write(report_fd, f"{name}: {exc.strerror or exc}".encode())
                raise

    return apply


async def _start_child(run_dir: str, limits: SandboxLimits, iso: Isolation, attempts: int = 7,
                       program: str | None = None) -> asyncio.subprocess.Process:
    """Start the sandbox process running ``program`` (Python source; default the runner in
    sandbox_child.py). Creating a network namespace can fail for a while on a busy host (the kernel
    frees namespaces asynchronously): retry with backoff for ~6 s, never fall back to weaker isolation,
    and name the step that failed."""
    source = CHILD.read_text() if program is None else program
    reason = ""
    for attempt in range(attempts):
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", source, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=run_dir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
                preexec_fn=_preexec(limits, iso, write_fd))
        except subprocess.SubprocessError as exc:
            reason = str(exc)
            with contextlib.suppress(BlockingIOError):
                reason = os.read(read_fd, 512).decode(errors="replace") or reason
        finally:
            os.close(read_fd)
            os.close(write_fd)
        if attempt + 1 < attempts:
            await asyncio.sleep(0.1 * 2 ** attempt)
    raise SandboxError(f"could not start the code sandbox ({reason})")


def _read_roots() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["stdlib"], paths["platstdlib"], sys.base_prefix + "/lib"})


async def run_python(code: str, inputs: dict[str, Any], limits: SandboxLimits) -> dict[str, Any]:
    """Run ``main(**inputs)`` from ``code`` in the sandbox; its dict result, or SandboxError."""
    iso = isolation()
    run_dir = tempfile.mkdtemp(prefix="inferstack-code-")
    if iso.drop_to_nobody:
        os.chown(run_dir, NOBODY, NOBODY)
    request = json.dumps({"code": code, "inputs": inputs, "run_dir": run_dir, "read_roots": _read_roots()})
    try:
        proc = await _start_child(run_dir, limits, iso)
        try:
            out, err = await asyncio.wait_for(proc.communicate(request.encode()), limits.wall_s)
        except TimeoutError:
            raise SandboxError(f"code ran longer than {limits.wall_s:g}s and was killed") from None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        return _result(out, err, proc.returncode, limits)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _result(out: bytes, err: bytes, rc: int | None, limits: SandboxLimits) -> dict[str, Any]:
    if len(out) > limits.output_kb << 10:
        raise SandboxError(f"code output is larger than {limits.output_kb} KiB")
    lines = out.decode(errors="replace").strip().splitlines()
    if not lines:
        tail = err.decode(errors="replace").strip()[-500:]
        why = {-signal.SIGXCPU: f"CPU limit ({limits.cpu_s}s)", -signal.SIGKILL: "killed: CPU or memory limit",
               -signal.SIGSEGV: "crashed"}.get(rc or 0, f"exit status {rc}")
        raise SandboxError(f"code process ended without a result ({why}); memory limit "
                           f"{limits.memory_mb} MiB; stderr: {tail}")
    reply = json.loads(lines[-1])
    if not reply["ok"]:
        raise SandboxError(reply["error"])
    return reply["outputs"]
