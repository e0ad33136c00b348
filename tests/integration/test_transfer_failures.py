"""The prefill side dies mid-transfer: the decode side gets a TransferError, never bad KV."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from inferstack.engine.connector.shm import SHM_DIR, remove_stale_segments
from inferstack.engine.connector.transfer import KVLayout, KVTransferClient
from inferstack.engine.connector.wire import TransferError
from support.procs import inferstack_env

PREFILL = """
import json, sys, time, torch
from inferstack.engine.connector.transfer import KVTransferServer, PagedKVSource

class SlowSource(PagedKVSource):
    def open(self, request_id):
        spec = super().open(request_id)
        inner = spec.read
        def read(first, n, out):
            time.sleep(0.3)               # a prefill engine busy with other work
            inner(first, n, out)
        spec.read = read
        return spec

torch.manual_seed(0)
caches = [torch.randn(2, 64, 16, 2, 8) for _ in range(3)]
source = SlowSource(caches)
source.hold("r", list(range(40)))
server = KVTransferServer(source, chunk_blocks=4)
print(json.dumps({"port": server.address[1]}), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("shm", [False, True])
def test_prefill_killed_mid_transfer(shm):
    proc = subprocess.Popen([sys.executable, "-c", PREFILL], env=inferstack_env(), stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        before = set(SHM_DIR.glob("inferstack-kvt-*"))
        client = KVTransferClient(KVLayout(3, 2, 8, 16, torch.float32), allow_shm=shm, timeout_s=10)
        torch.manual_seed(0)
        caches = [torch.randn(2, 64, 16, 2, 8) for _ in range(3)]
        received = []
        with pytest.raises(TransferError):
            for chunk in client.pull("127.0.0.1", port, "r"):
                expected = torch.stack([c[:, chunk.first_block:chunk.first_block + 4].reshape(2, 64, 2, 8)
                                        for c in caches])
                assert torch.equal(chunk.tensor, expected), "every chunk that is delivered is intact"
                received.append(chunk.index)
                if len(received) == 1:
                    proc.send_signal(signal.SIGKILL)
        assert received and received[0] == 0 and len(received) < 10
        assert client.stats.failures["recv"] == 1
        proc.wait(10)
        remove_stale_segments()           # what every transfer server does when it starts
        assert set(SHM_DIR.glob("inferstack-kvt-*")) <= before, "a killed server's segments are reclaimed"
    finally:
        proc.kill()
        proc.wait(5)

