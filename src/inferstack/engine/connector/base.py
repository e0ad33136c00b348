"""The KV connector interface, shaped like vLLM's ``KVConnectorBase_V1``.

A connector moves KV between the engine's paged cache and something outside it (KV tiers, a
prefill engine). The scheduler side decides *how many* tokens come from outside; the worker side
moves the bytes. Our engine is one process, so one object plays both roles, but the two halves
only talk through the state recorded in ``update_state_after_alloc``.

Step order inside ``EngineCore.step``:
1. ``Scheduler.schedule`` → for each newly admitted request,
   ``get_num_new_matched_tokens(request, num_device_hit_tokens)`` then, once blocks are
   allocated for them, ``update_state_after_alloc(request, block_ids, num_external_tokens)``;
2. ``start_load_kv()`` copies the external KV into those blocks before the model runs;
   ``take_failed_loads()`` names requests whose load failed there (recomputed instead); a load that
   lands layer by layer (``layer_loads``) is waited for per layer inside the forward pass;
3. the executor computes the rest; ``save_kv(seqs)`` hands newly full chunks to the store;
4. ``request_finished(request, block_ids)`` when a request ends; a connector may keep its blocks
   (``delay_free``) until ``take_finished_sending()`` says the blocks may be freed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.request import Request

if TYPE_CHECKING:      # annotations only: an emulated engine's scheduler must not import torch
    import torch


class LayerWait(Protocol):
    """A step's external KV still landing, layer by layer (vLLM's ``wait_for_layer_load``)."""

    def wait_for_layer(self, layer: int) -> None:
        """Return once ``layer``'s external KV is in the cache (or its load failed)."""

    def finish(self) -> list[tuple[str, bool]]:
        """After the forward pass: wait for the loads to end; (request id, whether its KV arrived:
        False means the step computed that request over garbage and must discard and recompute it)."""


class KVConnectorBase(ABC):
    # -- scheduler side -------------------------------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` (device prefix-cache hits) that can be loaded
        from outside, block-aligned and leaving at least one prompt token to compute, and whether
        the load is asynchronous. ``None`` means "not known yet": the KV is being read or pulled
        on a background thread, and the scheduler should run other requests and ask again.
        An asynchronous load (vLLM's ``load_kv_async``) starts in ``update_state_after_alloc``; the
        request then waits for remote KV, unscheduled, until ``take_finished_recving`` names it."""

    @abstractmethod
    def update_state_after_alloc(self, request: Request, block_ids: Sequence[int], num_external_tokens: int) -> None:
        """The scheduler allocated ``block_ids`` (all of the request's blocks) and accepted
        ``num_external_tokens`` of the offer (0 releases the staged KV)."""

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        """Returns (delay_free, kv_transfer_params for the response)."""
        return False, None

    def take_events(self) -> list[Any]:
        """KV events (``BlockStored``/``BlockRemoved`` with a tier ``medium``) since the last call."""
        return []

    def take_finished_sending(self) -> list[str]:
        """Requests whose blocks were held (delay_free) and may now be freed."""
        return []

    def take_finished_recving(self) -> list[tuple[str, bool]]:
        """Asynchronous loads that ended since the last call: (request id, whether the KV is now in
        its blocks; False leaves garbage there, to be recomputed)."""
        return []

    def take_started_recving(self) -> list[str]:
        """Asynchronous loads landing layer by layer whose first layer is in (each named once): the
        request may run before the load ends, since the step's forward pass waits for each layer it
        reads (`layer_loads`). Loads never named here are reported by `take_finished_recving` only."""
        return []

    def layer_loads(self, request_ids: Sequence[str]) -> LayerWait | None:
        """The still-landing loads of ``request_ids`` (requests named by `take_started_recving` and
        scheduled in this step), or None; `take_finished_recving` no longer reports them."""
        return None

    def serve_holds(self, pool: BlockPool) -> None:
        """On the engine thread at the start of each schedule: pin cached blocks peers asked to READ
        (cross-replica reuse) and unpin those whose reads ended."""
        return None

    def reuse_address(self) -> str | None:
        """HOST:PORT where other replicas READ the prefixes this engine holds (``--kv-reuse``), or None."""
        return None

    def set_waker(self, wake: Callable[[], None]) -> None:
        """``wake()`` makes an idle engine thread run a step (so it serves a peer's pin soon)."""
        return None

    # -- worker side ----------------------------------------------------------------------------
    @abstractmethod
    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """The engine's per-layer paged caches, each ``[2, num_blocks, block_size, H, D]``."""

    @abstractmethod
    def start_load_kv(self) -> None:
        """Copy every staged load into its blocks; runs before the step's forward pass."""

    def take_failed_loads(self) -> list[str]:
        """Requests whose external KV did not arrive in ``start_load_kv`` (a direct read into their
        blocks failed): their blocks hold garbage, the scheduler must recompute them."""
        return []

    def save_kv(self, seqs: Sequence[Any]) -> None:
        """After a step: save KV that became complete (``seqs`` are the step's ScheduledSeqs)."""
        return None

    def shutdown(self) -> None:
        return None
