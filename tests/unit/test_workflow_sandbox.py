"""Code-node sandbox: escapes are tried for real and must be refused (network, files, processes, memory,
CPU, wall time); plain code still runs and may use its own run directory."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from inferstack.workflow import sandbox
from inferstack.workflow.sandbox import (
    CLONE_NEWNET,
    CLONE_NEWUSER,
    Isolation,
    SandboxError,
    SandboxLimits,
    _start_child,
    isolation,
    run_python,
)

LIMITS = SandboxLimits(memory_mb=200, cpu_s=1, wall_s=4.0)


def run(code: str, **inputs: object) -> dict:
    return asyncio.run(run_python(code, dict(inputs), LIMITS))


def refused(code: str, limits: SandboxLimits = LIMITS) -> str:
    with pytest.raises(SandboxError) as err:
        asyncio.run(run_python(code, {}, limits))
    return str(err.value)


def test_plain_code_runs_and_uses_its_run_dir() -> None:
    code = ("import json, math\n"
            "def main(a: int) -> dict:\n"
            "    open('scratch.txt', 'w').write(json.dumps({'r': math.isqrt(a)}))\n"
            "    print('user prints do not break the result')\n"
            "    return json.loads(open('scratch.txt').read())\n")
    assert run(code, a=49) == {"r": 7}


@pytest.mark.parametrize("code", [
    "import socket\ndef main():\n    socket.create_connection(('127.0.0.1', 80))\n",
    "import socket\ndef main():\n    socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n",
    "import urllib.request\ndef main():\n    urllib.request.urlopen('http://127.0.0.1:1/')\n",
])
def test_network_refused(code: str) -> None:
    assert "sandbox: socket." in refused(code)


def test_network_namespace_blocks_even_without_the_audit_hook(tmp_path) -> None:
    """The kernel layer alone: a plain interpreter started the way the sandbox starts its child (same
    pre-exec, same retries while the host frees namespaces) cannot reach a listener."""
    if not isolation().netns_flags:
        pytest.skip("this machine allows no network namespace; the audit hook is the only network guard")

    async def probe(port: int) -> tuple[int | None, str]:
        proc = await _start_child(str(tmp_path), LIMITS, isolation(),
                                  program=f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)")
        _, err = await asyncio.wait_for(proc.communicate(b""), 20)
        return proc.returncode, err.decode()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        rc, stderr = asyncio.run(probe(listener.getsockname()[1]))
    assert rc != 0 and "Network is unreachable" in stderr, stderr


@pytest.mark.parametrize(("code", "what"), [
    ("def main():\n    return {'x': open('/etc/hostname').read()}\n", "outside the run directory"),
    ("def main():\n    open('/tmp/inferstack-sandbox-escape', 'w').write('x')\n", "outside the run directory"),
    ("import os\ndef main():\n    return {'x': os.listdir('/')}\n", "outside the run directory"),
    ("import os\ndef main():\n    os.open('/etc/hostname', os.O_RDONLY)\n", "outside the run directory"),
    ("import os\ndef main():\n    os.remove('/tmp/anything')\n", "outside the run directory"),
    ("def main():\n    return {'x': open('../../etc/hostname').read()}\n", "outside the run directory"),
])
def test_files_outside_the_run_dir_refused(code: str, what: str) -> None:
    assert what in refused(code)


@pytest.mark.parametrize("code", [
    "import os\ndef main():\n    while True:\n        os.fork()\n",
    "import subprocess\ndef main():\n    subprocess.run(['sh', '-c', ':(){ :|:& };:'])\n",
    "import os\ndef main():\n    os.system('true')\n",
    "import ctypes\ndef main():\n    ctypes.CDLL(None).fork()\n",
])
def test_process_creation_refused(code: str) -> None:
    assert "is not allowed" in refused(code)


def test_memory_limit() -> None:
    assert "MemoryError" in refused("def main():\n    x = bytearray(1 << 30)\n    return {}\n")


def test_cpu_and_wall_limits() -> None:
    # A wall limit far above the CPU limit: on a loaded machine the busy loop may take many seconds of
    # wall time to burn 1 s of CPU, and the wall limit must not answer first. The message still proves
    # the CPU limit (SIGXCPU) stopped it, not the wall clock.
    busy = SandboxLimits(memory_mb=LIMITS.memory_mb, cpu_s=1, wall_s=120.0)
    assert "CPU limit (1s)" in refused("def main():\n    while True:\n        pass\n", busy)
    assert "longer than 1s" in refused("import time\ndef main():\n    time.sleep(30)\n",
                                        SandboxLimits(wall_s=1.0))


def test_bad_results_are_errors() -> None:
    assert "must return a dict" in refused("def main():\n    return 3\n")
    assert "ZeroDivisionError" in refused("def main():\n    return {'x': 1 / 0}\n")


def test_a_set_up_step_that_fails_is_named(tmp_path):
    """subprocess says only "Exception occurred in preexec_fn": the error names the step and the reason
    (here an unshare flag the kernel rejects)."""
    bad = Isolation(netns_flags=1, drop_to_nobody=False)
    with pytest.raises(SandboxError, match=r"network namespace \(unshare\): Invalid argument"):
        asyncio.run(_start_child(str(tmp_path), LIMITS, bad, attempts=2))


@pytest.mark.parametrize(("answers", "want_flags", "waits"), [
    # the host frees namespaces for a few seconds (longer than the 3 tries of 0.35 s the probe made before):
    # wait, then take the network namespace
    ([errno.EACCES, *[errno.ENOSPC] * 4, errno.EAGAIN, None], CLONE_NEWUSER | CLONE_NEWNET, 5),
    # not allowed here (and `nobody` may not run the interpreter): the audit hook alone, without waiting
    ([errno.EACCES, errno.EPERM], 0, 0),
])
def test_the_probe_waits_out_a_busy_host_but_not_a_refusal_for_good(monkeypatch, answers, want_flags, waits) -> None:
    """The isolation level is chosen once per process: a namespace the kernel refuses for a moment (ENOSPC
    while it frees old ones) must not leave the process on the audit hook alone for its whole life."""
    asked, slept = iter(answers), []
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 0)
    monkeypatch.setattr(sandbox, "_refusal", lambda iso: next(asked))
    monkeypatch.setattr(sandbox.time, "sleep", slept.append)
    assert isolation.__wrapped__().netns_flags == want_flags
    assert len(slept) == waits and next(asked, "all used") == "all used"
