"""The NIXL transport between two real processes: exact bytes, a prefill process killed between the
offer and the READ, metadata gone stale when the prefill process restarts on the same address, and
UCX unable to start (a precise error for --kv-transport nixl, the shm transport for auto)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from inferstack.engine.connector.nixl_agent import NixlAgent, nixl_missing
from inferstack.engine.connector.nixl_transport import NixlKVTransport, RemoteLoad
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.transfer import KVLayout, KVTransferClient
from inferstack.engine.connector.transports import PullRequest, TcpKVTransport
from inferstack.engine.connector.wire import TransferError
from support.procs import inferstack_env

if nixl_missing() is not None:
    pytest.skip(f"nixl does not import: {nixl_missing()}", allow_module_level=True)

SECRET = b"stack-secret"
SHAPE = (2, 64, 16, 2, 8)          # per layer: [2, blocks, block_size, heads, dim]
PREFILL = """
import json, sys, time, torch
from inferstack.engine.connector.nixl_agent import NixlAgent
from inferstack.engine.connector.nixl_transport import NixlExporter
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.transfer import KVTransferServer, PagedKVSource

torch.manual_seed(int(sys.argv[2]))
caches = [torch.randn(2, 64, 16, 2, 8) for _ in range(3)]
source = PagedKVSource(caches)
for rid in ("a", "b", "c", "d"):
    source.hold(rid, list(range(40, 10, -1)), [bytes([i]) * 32 for i in range(30)])
exporter = NixlExporter(NixlAgent("prefill", caches), TransferTrust(secret=b"stack-secret"))
server = KVTransferServer(source, port=int(sys.argv[1]), nixl=exporter)
print(json.dumps({"port": server.address[1], "agent": exporter.agent.name}), flush=True)
time.sleep(120)
"""


def start_prefill(port: int = 0, seed: int = 0) -> tuple[subprocess.Popen, int, str]:
    proc = subprocess.Popen([sys.executable, "-c", PREFILL, str(port), str(seed)], env=inferstack_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    while line and not line.startswith("{"):     # UCX prints its own warnings to stdout
        line = proc.stdout.readline()
    assert line, "the prefill process did not start"
    info = json.loads(line)
    return proc, info["port"], info["agent"]


def expected_blocks(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    caches = [torch.randn(*SHAPE) for _ in range(3)]
    return torch.stack([c[:, list(range(40, 10, -1))] for c in caches])     # [L, 2, 30, bs, H, D]


@pytest.fixture
def decode():
    caches = [torch.zeros(*SHAPE) for _ in range(3)]
    layout = KVLayout(3, 2, 8, 16, torch.float32)
    trust = TransferTrust(secret=SECRET)
    transport = NixlKVTransport(NixlAgent("decode", caches), layout, trust,
                                TcpKVTransport(KVTransferClient(layout)), timeout_s=10)
    yield transport, caches
    transport.close()


def pull(transport: NixlKVTransport, port: int, rid: str) -> RemoteLoad:
    hashes = [bytes([i]) * 32 for i in range(30)]
    fetched = transport.fetch(PullRequest("127.0.0.1", port, rid, hashes, first_block=2, max_blocks=30))
    assert not fetched.failed and isinstance(fetched.load, RemoteLoad)
    return fetched.load


def test_read_into_paged_blocks_then_peer_killed_then_peer_restarted(decode):
    """Also: a pull without the secret gets no metadata."""
    transport, caches = decode
    proc, port, agent = start_prefill()
    try:
        load = pull(transport, port, "a")
        assert (load.first_block, load.num_blocks) == (2, 28)
        local = list(range(63, 35, -1))           # scattered, reversed: only runs consecutive on both sides merge
        load.accept([0, 1, *local], 30 * 16, 16)
        load.copy_into(caches, 16)
        got = torch.stack([c[:, local] for c in caches])
        assert torch.equal(got, expected_blocks(0)[:, :, 2:]), "the READ put the peer's blocks in ours, in order"
        assert transport.stats.transfers[("recv", "nixl")] == 1
        assert transport.agent.known_peer(f"127.0.0.1:{port}") == agent
        assert transport.control.idle("127.0.0.1", port) == 1, "the control connection is kept for the next pull"

        # a decode engine without the stack's secret gets no NIXL metadata (it may pull over TCP/shm)
        stranger = NixlKVTransport(NixlAgent("stranger", [torch.zeros(*SHAPE)]), transport.layout,
                                   TransferTrust(peers=frozenset({"127.0.0.1"})), transport.fallback, timeout_s=10)
        fetched = stranger.fetch(PullRequest("127.0.0.1", port, "c", [bytes([i]) * 32 for i in range(30)], 0, 30))
        assert stranger.agent.known_peer(f"127.0.0.1:{port}") == "" and stranger.stats.transfers == {}
        assert fetched.load is not None and not isinstance(fetched.load, RemoteLoad)
        stranger.agent.close()

        load = pull(transport, port, "b")         # offered and counted as external (on the kept connection) ...
        assert transport.control.idle("127.0.0.1", port) == 0
        load.accept([0, 1, *local], 30 * 16, 16)
        other = pull(transport, port, "d")        # (a second connection, kept once its READ is done)
        other.accept([0, 1, *local], 30 * 16, 16)
        other.copy_into(caches, 16)
        assert transport.control.idle("127.0.0.1", port) == 1
        proc.send_signal(signal.SIGKILL)          # ... then the prefill engine dies before the READ
        proc.wait(10)
        with pytest.raises(TransferError):
            load.copy_into(caches, 16)
        assert transport.stats.failures["recv"] == 1
        assert transport.control.idle("127.0.0.1", port) == 1, "a failed READ's connection is not kept"

        proc, port2, agent2 = start_prefill(port, seed=1)    # same address, new agent, new memory keys
        assert port2 == port and agent2 != agent
        load = pull(transport, port, "a")         # the kept connection went to the dead process: replaced
        assert transport.agent.known_peer(f"127.0.0.1:{port}") == agent2, "stale metadata replaced"
        load.accept([0, 1, *local], 30 * 16, 16)
        load.copy_into(caches, 16)
        assert torch.equal(torch.stack([c[:, local] for c in caches]), expected_blocks(1)[:, :, 2:])
        assert transport.stats.transfers[("recv", "nixl")] == 3 and transport.stats.failures["recv"] == 1
        assert transport.control.idle("127.0.0.1", port) == 1
    finally:
        proc.kill()
        proc.wait(10)


UCX_DOWN = """
import logging, sys, torch
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from inferstack.engine.connector.nixl_agent import NixlUnavailable
from inferstack.engine.connector.pd_connector import PDConnector
from inferstack.engine.connector.peers import TransferTrust
caches = [torch.zeros(2, 8, 16, 2, 8)]
try:
    PDConnector("decode", trust=TransferTrust(secret=b"s"), transport="nixl").register_kv_caches(caches)
except NixlUnavailable as exc:
    print("nixl:", exc)
auto = PDConnector("decode", trust=TransferTrust(secret=b"s"), transport="auto")
auto.register_kv_caches(caches)
print("auto:", auto.transport_name)
"""


def test_ucx_that_cannot_start_is_named_and_auto_falls_back():
    res = subprocess.run([sys.executable, "-c", UCX_DOWN], env={**inferstack_env(), "UCX_TLS": "bogus"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stdout.splitlines() if x.startswith(("nixl:", "auto:"))]   # UCX warns on stdout too
    assert lines[0].startswith("nixl: NIXL transport: the UCX backend did not start") and "UCX_TLS=bogus" in lines[0]
    assert lines[1] == "auto: shm"
    assert "--kv-transport auto falls back to the shm transport" in res.stderr
