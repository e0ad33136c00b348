import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One torch (OpenMP) thread per process, here and in every engine, lab and CLI the tests start: the suite runs
# two workers on two cores, and an OpenMP team of two that shares its cores with the other worker spins at
# each barrier while its partner waits for a core. Measured on this machine under load: 16 decode steps of
# 4 prompts took 25-28 CPU-s with two threads and 1.8-2.0 CPU-s with one (docs/testing.md). Set before
# anything imports torch, which reads it once. A process that still asks for more threads (`inferstack up`
# gives one engine every core) waits passively instead: 2.4 CPU-s for the same work with two threads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# CI replays the same examples on every run (.ci/run sets HYPOTHESIS_PROFILE=ci): a landing must not
# hinge on the draw. Developers' runs keep drawing fresh examples. No per-example deadline in either: the
# properties are about results, and on two shared cores one example of a cheap property (the performance
# model's step time) passed hypothesis's 200 ms deadline under load and failed a run.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("default", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# Tests never leave files in the checkout (a `lab run` without --out writes ./lab-NAME, a server's
# default log dir, a benchmark's output): everything goes under tmp_path. The session fails if the
# repository's top level gained an entry while it ran.
_ROOT = Path(__file__).resolve().parents[1]
_ROOT_ENTRIES = pytest.StashKey[set[str]]()
_TOOL_CACHES = {".pytest_cache", ".hypothesis", ".ruff_cache", "__pycache__"}


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_ROOT_ENTRIES] = set(os.listdir(_ROOT))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_ROOT_ENTRIES, None)
    if before is None:
        return
    litter = sorted(set(os.listdir(_ROOT)) - before - _TOOL_CACHES)
    if litter:
        session.config.get_terminal_writer().line(
            f"\ntests left files in the checkout ({_ROOT}): {', '.join(litter)}; write them under tmp_path", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
