"""The Kubernetes API client for discovery: lightkube's AsyncClient from the pool's kubeconfig, or the
in-cluster service account, else $KUBECONFIG / ~/.kube/config (lightkube's KubeConfig.from_env)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ConfigError as KubeConfigError

from inferstack.kube.config import KubernetesPoolConfig


class KubeClientError(Exception):
    """No usable Kubernetes credentials for a pool (a startup error, with the fix in the message)."""


def make_client(pool: str, cfg: KubernetesPoolConfig) -> AsyncClient:
    return client_for(cfg.kubeconfig, f"pools.{pool}.kubernetes")


def client_for(kubeconfig: str | None, section: str) -> AsyncClient:
    """A client from ``kubeconfig``, else the in-cluster service account or $KUBECONFIG; ``section`` names
    the config section in the error."""
    try:
        config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
    except (KubeConfigError, OSError, KeyError) as exc:
        where = (f"kubeconfig {kubeconfig!r}" if kubeconfig
                 else "no in-cluster service account and no $KUBECONFIG or ~/.kube/config")
        raise KubeClientError(f"{section}: cannot load Kubernetes credentials ({where}): {exc}") from None
    # connect/read bound every call except the watch stream, whose read timeout lightkube lifts
    return AsyncClient(config, timeout=httpx2.Timeout(10.0, connect=3.0))


async def stop_all(tasks: Iterable[asyncio.Task], clients: Iterable[AsyncClient]) -> None:
    """Cancel background tasks that use Kubernetes clients, wait for them, then close the clients."""
    tasks = list(tasks)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()
