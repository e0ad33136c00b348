"""NIXL direct READs (no offer before the READ, the claim after it) between two real processes: the
bytes are right, and every way the hold can be gone or the params wrong ends in a refused claim or a
failed READ (the engine then recomputes), never in bytes used without proof that they were held."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from inferstack.engine.connector.nixl_agent import NixlAgent, nixl_missing
from inferstack.engine.connector.nixl_transport import NixlKVTransport, RemoteLoad
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.transfer import KVLayout, KVTransferClient
from inferstack.engine.connector.transports import DirectRead, PullRequest, TcpKVTransport
from inferstack.engine.connector.wire import TransferError
from support.procs import inferstack_env

if nixl_missing() is not None:
    pytest.skip(f"nixl does not import: {nixl_missing()}", allow_module_level=True)

SHAPE = (2, 64, 16, 2, 8)          # per layer: [2, blocks, block_size, heads, dim]
LAYERS = 3
HELD = list(range(40, 10, -1))     # the prefill side's blocks of every request, 30 of them
HASHES = [bytes([i]) * 32 for i in range(30)]
# The prefill engine, driven over stdin: "hold RID" (prints the hold's token), "held" (the held ids),
# "expire" (every unleased hold let go, as after hold_s), "scribble" (the freed blocks reused: new bytes).
PREFILL = """
import json, sys, time, torch
from inferstack.engine.connector.nixl_agent import NixlAgent
from inferstack.engine.connector.nixl_transport import NixlExporter
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.transfer import KVTransferServer, PagedKVSource

torch.manual_seed(int(sys.argv[2]))
caches = [torch.randn(2, 64, 16, 2, 8) for _ in range(3)]
source = PagedKVSource(caches)
exporter = NixlExporter(NixlAgent("prefill", caches), TransferTrust(secret=b"stack-secret"))
server = KVTransferServer(source, port=int(sys.argv[1]), nixl=exporter)
print(json.dumps({"port": server.address[1], "agent": exporter.agent.name}), flush=True)
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "hold":
        source.hold(arg[0], list(range(40, 10, -1)), [bytes([i]) * 32 for i in range(30)])
        print(json.dumps(source.token(arg[0])), flush=True)
    elif cmd == "held":
        print(json.dumps(sorted(source.held())), flush=True)
    elif cmd == "expire":
        source.expire(time.monotonic() + 3600)
        print("null", flush=True)
    elif cmd == "scribble":
        for c in caches:
            c.normal_()
        print("null", flush=True)
"""


class Prefill:
    def __init__(self, port: int = 0, seed: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PREFILL, str(port), str(seed)], env=inferstack_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        info = self._answer()
        self.port, self.agent, self.seed = info["port"], info["agent"], seed

    def _answer(self):
        line = self.proc.stdout.readline()
        while line and not line.startswith(("{", "[", '"', "null")):    # UCX prints its own warnings to stdout
            line = self.proc.stdout.readline()
        assert line, "the prefill process ended"
        return json.loads(line)

    def ask(self, command: str):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def held_soon(self, expected: list[str], timeout_s: float = 10.0) -> list[str]:
        """The held ids once they equal ``expected`` (or the last answer at the timeout): after an offered
        pull the server's thread lets the hold go just after it sent END, which the reader may outrun."""
        deadline = time.monotonic() + timeout_s
        held = self.ask("held")
        while held != expected and time.monotonic() < deadline:
            time.sleep(0.01)
            held = self.ask("held")
        return held

    def direct(self, rid: str) -> DirectRead:
        """Hold ``rid``'s blocks; what its signed kv_transfer_params say for a direct READ."""
        return DirectRead(self.agent, self.ask(f"hold {rid}"), tuple(HELD), HASHES[-1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def expected_blocks(seed: int, caches: list[torch.Tensor] | None = None) -> torch.Tensor:
    if caches is None:
        torch.manual_seed(seed)
        caches = [torch.randn(*SHAPE) for _ in range(LAYERS)]
    return torch.stack([c[:, HELD] for c in caches])     # [L, 2, 30, bs, H, D]


LOCAL = list(range(63, 35, -1))     # the decode side's blocks for request blocks 2..29


@pytest.fixture
def decode():
    caches = [torch.zeros(*SHAPE) for _ in range(LAYERS)]
    layout = KVLayout(LAYERS, 2, 8, 16, torch.float32)
    transport = NixlKVTransport(NixlAgent("decode", caches, threads=2), layout, TransferTrust(secret=b"stack-secret"),
                                TcpKVTransport(KVTransferClient(layout)), timeout_s=10)
    yield transport, caches
    transport.close()


@pytest.fixture
def prefill():
    proc = Prefill()
    yield proc
    proc.proc.kill()
    proc.proc.wait(10)


def fetch(transport: NixlKVTransport, port: int, rid: str, direct: DirectRead | None,
          hashes: list[bytes] = HASHES, refused: bool = False) -> RemoteLoad:
    fetched = transport.fetch(PullRequest("127.0.0.1", port, rid, hashes, first_block=2, max_blocks=30,
                                          direct=direct))
    assert fetched.failed == refused and isinstance(fetched.load, RemoteLoad)
    fetched.load.accept([0, 1, *LOCAL], 30 * 16, 16)
    return fetched.load


def landed(caches: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([c[:, LOCAL] for c in caches])


def first_pull(transport: NixlKVTransport, prefill: Prefill, caches: list[torch.Tensor]) -> None:
    """A decode engine that never pulled from this peer asks for an offer (it needs the metadata)."""
    load = fetch(transport, prefill.port, "first", prefill.direct("first"))
    assert load.conn is not None and load.claim is None, "no direct READ from an agent not loaded yet"
    load.copy_into(caches, 16)


def test_a_direct_read_needs_no_offer_and_is_claimed_after(decode, prefill):
    transport, caches = decode
    first_pull(transport, prefill, caches)
    assert transport.control.idle("127.0.0.1", prefill.port) == 1
    load = fetch(transport, prefill.port, "a", prefill.direct("a"))
    assert load.conn is None and load.claim is not None, "READ at once: no round trip before it"
    assert transport.control.idle("127.0.0.1", prefill.port) == 1, "the control connection was not used"
    caches[0].zero_()
    load.copy_into(caches, 16)
    assert torch.equal(landed(caches), expected_blocks(0)[:, :, 2:])
    assert prefill.held_soon([]) == [], "the claim freed the hold"
    assert transport.stats.transfers[("recv", "nixl")] == 2 and "recv" not in transport.stats.failures
    assert transport.control.idle("127.0.0.1", prefill.port) == 1, "the claim's connection is kept"


def test_no_direct_read_through_an_agent_not_connected_to_the_peer(decode, prefill):
    """UCX connects an agent to a peer only while the peer progresses UCX (it does while serving an offer):
    a first direct READ through the copy-thread agent (large transfers) would wait for its timeout."""
    transport, caches = decode
    first_pull(transport, prefill, caches)                    # through the direct agent (a small transfer)
    transport.agent.bulk_min_bytes = 1                        # this transfer is large: the copy-thread agent
    transport.agent.min_read_bytes = 1                        # in layer groups: the first through the direct agent
    load = fetch(transport, prefill.port, "a", prefill.direct("a"))
    assert load.claim is None, "the copy-thread agent never READ from this peer: the offer first"
    load.copy_into(caches, 16)
    load = fetch(transport, prefill.port, "b", prefill.direct("b"))
    assert load.claim is not None
    caches[2].zero_()
    load.copy_into(caches, 16)
    assert torch.equal(landed(caches), expected_blocks(0)[:, :, 2:])


def test_a_hold_let_go_before_the_read_is_never_used(decode, prefill):
    """Lease expired before the READ, the blocks reused (new bytes), and then held again under the same
    request id (a new token): the READ got the new bytes, and the claim is refused either way."""
    transport, caches = decode
    first_pull(transport, prefill, caches)
    stale = fetch(transport, prefill.port, "a", prefill.direct("a"))
    again = fetch(transport, prefill.port, "b", prefill.direct("b"))
    prefill.ask("expire")
    prefill.ask("scribble")
    with pytest.raises(TransferError, match="not in place"):
        stale.copy_into(caches, 16)
    prefill.ask("hold b")                       # the same id held again: the old params name the old hold
    with pytest.raises(TransferError, match="not in place"):
        again.copy_into(caches, 16)
    assert prefill.held_soon(["b"]) == ["b"], "a refused claim frees nothing"
    assert transport.stats.failures["recv"] == 2


def test_forged_or_mismatched_params(decode, prefill):
    """A wrong token, block ids other than the held ones, or a claim without the stack secret: refused,
    the hold left in place. Params whose last hash is not this prompt's, or naming an agent not loaded:
    no direct READ (the offer's checks decide)."""
    transport, caches = decode
    first_pull(transport, prefill, caches)
    real = prefill.direct("a")
    for forged in (DirectRead(real.agent, "0" * 16, real.block_ids, real.last_hash),
                   DirectRead(real.agent, real.hold, tuple(b - 1 for b in real.block_ids), real.last_hash)):
        with pytest.raises(TransferError, match="not in place"):
            fetch(transport, prefill.port, "a", forged).copy_into(caches, 16)
    assert prefill.held_soon(["a"]) == ["a"]
    stranger = NixlKVTransport(transport.agent, transport.layout, TransferTrust(secret=b"other"),
                               transport.fallback, timeout_s=10)
    stranger._regions = transport._regions
    with pytest.raises(TransferError, match="not signed"):
        fetch(stranger, prefill.port, "a", real).copy_into(caches, 16)
    assert prefill.held_soon(["a"]) == ["a"]

    other_prompt = [*HASHES[:-1], b"x" * 32]
    load = fetch(transport, prefill.port, "a", real, hashes=other_prompt, refused=True)
    assert load.claim is None and load.num_blocks == 27, "the offer's per-block check: 27 leading blocks usable"
    load.copy_into(caches, 16)
    assert torch.equal(landed(caches)[:, :, :27], expected_blocks(0)[:, :, 2:29])
    unknown = dataclasses.replace(prefill.direct("c"), agent="inferstack-prefill-0-feedface")
    load = fetch(transport, prefill.port, "c", unknown)
    assert load.claim is None, "an agent not loaded for that address is asked for an offer"
    load.copy_into(caches, 16)
    assert torch.equal(landed(caches), expected_blocks(0)[:, :, 2:])
    assert prefill.held_soon([]) == []


def test_peer_killed_mid_read_then_restarted_with_stale_params(decode, prefill):
    transport, caches = decode
    first_pull(transport, prefill, caches)
    transport.agent.min_read_bytes = 1          # one READ per layer group: 1, then 2 layers
    load = fetch(transport, prefill.port, "a", prefill.direct("a"))
    stale = fetch(transport, prefill.port, "b", prefill.direct("b"))
    real_landed = load.layers.landed

    def kill_after_the_first_layer(layer: int) -> None:
        real_landed(layer)
        if layer == 0:
            prefill.kill()

    load.layers.landed = kill_after_the_first_layer
    with pytest.raises(TransferError):
        load.copy_into(caches, 16)

    restarted = Prefill(prefill.port, seed=1)   # same address, new agent
    try:
        with pytest.raises(TransferError):      # params of the dead agent: its memory is gone, no claim holds
            stale.copy_into(caches, 16)
        fresh = fetch(transport, restarted.port, "a", restarted.direct("a"))
        assert fresh.claim is None, "a new agent at the address: the offer brings its metadata"
        fresh.copy_into(caches, 16)
        assert torch.equal(landed(caches), expected_blocks(1)[:, :, 2:])
        direct = fetch(transport, restarted.port, "b", restarted.direct("b"))
        assert direct.claim is not None
        caches[1].zero_()
        direct.copy_into(caches, 16)
        assert torch.equal(landed(caches), expected_blocks(1)[:, :, 2:])
        assert transport.stats.failures["recv"] == 2
    finally:
        restarted.proc.kill()
        restarted.proc.wait(10)
