"""Builds the engine's KV connector from its config (``--kv-tiers ...``, ``--role``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from prometheus_client.registry import Collector

from inferstack.engine.config import EngineConfig
from inferstack.engine.connector.base import KVConnectorBase
from inferstack.engine.connector.kvstore_connector import KVStoreConnector
from inferstack.engine.connector.pd_connector import MultiConnector, PDConnector
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.stats import ConnectorCollector, TransferCollector
from inferstack.engine.connector.transfer import LinkModel
from inferstack.engine.kv.hashing import CHUNK_SIZE, KVKeySpace
from inferstack.kvstore.codec import ChunkLayout
from inferstack.kvstore.config import build_store
from inferstack.kvstore.metrics import KVStoreCollector


def build_connector(config: EngineConfig, kv_caches: Sequence[torch.Tensor], key_space: KVKeySpace,
                    link: LinkModel | None = None) -> KVConnectorBase | None:
    """PD transfer for ``--role prefill|decode``, then KV tiers for ``--kv-tiers``; None if neither.
    ``link`` is the network an emulated engine's PD transfers stand for."""
    connectors: list[KVConnectorBase] = []
    if config.kv_role != "both" or config.kv_reuse:
        trust = TransferTrust.from_config(config.kv_transfer_peers, config.kv_transfer_secret)
        connectors.append(PDConnector(config.kv_role, trust=trust, block_size=config.block_size,
                                      host=config.kv_transfer_host, port=config.kv_transfer_port,
                                      transport=config.kv_transport, link=link, reuse=config.kv_reuse))
    store_cfg = config.kv_store
    if store_cfg.enabled:
        if config.block_size * 16 != CHUNK_SIZE:
            raise ValueError(f"KV tiers need --block-size 16 (chunks are {CHUNK_SIZE} tokens), got {config.block_size}")
        _, _, _, heads, dim = kv_caches[0].shape
        layout = ChunkLayout(num_layers=len(kv_caches), num_kv_heads=heads, head_dim=dim,
                             dtype=kv_caches[0].dtype, tokens=CHUNK_SIZE)
        connectors.append(KVStoreConnector(build_store(store_cfg, layout, key_space.root),
                                           block_size=config.block_size))
    if not connectors:
        return None
    connector = connectors[0] if len(connectors) == 1 else MultiConnector(connectors)
    connector.register_kv_caches(kv_caches)
    return connector


def connector_collectors(connector: KVConnectorBase, model_name: str) -> list[Collector]:
    """Prometheus collectors for the engine's /metrics registry: per-tier, write-back, connector
    load/save/fetch times; register each with ``registry.register(c)``."""
    parts = connector.connectors if isinstance(connector, MultiConnector) else [connector]
    out: list[Collector] = []
    for part in parts:
        if isinstance(part, KVStoreConnector):
            out.append(KVStoreCollector(part.store, model_name))
            out.append(ConnectorCollector(part.stats, model_name, "kvstore"))
        elif isinstance(part, PDConnector):
            out.append(ConnectorCollector(part.stats, model_name, "pd"))
            out.append(TransferCollector(part, model_name))
    return out


def metric_doc_rows() -> list[str]:
    """Rows of docs/metrics.md's KV section, read from the real collectors (one host tier and one
    transfer of each kind recorded, so that every family shows its labels)."""
    from types import SimpleNamespace

    from inferstack.engine.connector.stats import ConnectorStats
    from inferstack.engine.connector.transfer import TransferStats
    from inferstack.kvstore.store import TieredKVStore
    from inferstack.kvstore.tiers import HostTier

    store = TieredKVStore([HostTier(1 << 20)], ChunkLayout(1, 1, 1, torch.float32), bytes(32))
    transfers = TransferStats()
    transfers.record("recv", "tcp", 1, 1.0)
    transfers.fail("recv")
    collectors = [KVStoreCollector(store, "m"), ConnectorCollector(ConnectorStats(), "m", "kvstore"),
                  TransferCollector(SimpleNamespace(transfer_stats=lambda: [transfers]), "m")]
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for collector in collectors:
        for fam in collector.collect():
            name = fam.name + ("_total" if fam.type == "counter" else "")
            labels = sorted({k for s in fam.samples for k in s.labels if k != "le"})
            rows.append(f"| `{name}` | {fam.type} | {', '.join(f'`{x}`' for x in labels) or '—'} "
                        f"| {fam.documentation} |")
    store.close()
    return rows
