"""Who the engine's work is for, and the order it is admitted in.

Every :class:`~api.engine.types.GenerationRequest` names its tenant:

- ``key:<label>``: a caller with an API key (its label from :func:`api.security.key_label`,
  never the key), through the API or a protected UI;
- ``ui:<address>``: an anonymous visitor of the public UI, by client address (after the
  trusted-proxy step), since session hashes are chosen by the client;
- ``anon:<address>``: the API when no keys are configured;
- ``local``: in-process work that names nobody (the batch command line, tests).

The wait queue (:class:`TenantQueue`) keeps one queue per tenant, ordered by the request's
``priority`` (vLLM's field: lower sooner) and then by arrival, and admits tenants in turn:
the tenant with the fewest rows in the batch goes first, ties to the one served least
recently, so a tenant that queued a hundred requests delays a newcomer by at most one
admission. Anonymous UI work as a whole may hold at most a share of the batch's rows while
any other request waits (``THAI_UI_ENGINE_SHARE``); when nothing else waits it may use the
idle rows, and other tenants take them back as its rows finish (nothing is preempted).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

LOCAL_TENANT = "local"
UI_PREFIX = "ui:"
T = TypeVar("T")


def key_tenant(label: str) -> str:
    return f"key:{label}"


def ui_tenant(address: str) -> str:
    return f"{UI_PREFIX}{address}"


def anon_tenant(address: str) -> str:
    return f"anon:{address}"


def is_ui_tenant(tenant: str) -> bool:
    return tenant.startswith(UI_PREFIX)


def ui_row_cap(share: float, max_batch_size: int) -> int:
    """The most rows anonymous UI work holds while other work waits (at least one)."""
    return max(1, math.ceil(share * max_batch_size - 1e-9))


class TenantQueue(Generic[T]):
    """Waiting items, one priority queue per tenant; not thread-safe (the scheduler's lock
    guards it). ``tenant_of`` and ``priority_of`` read an item's tenant and priority."""

    def __init__(self, tenant_of: Callable[[T], str], priority_of: Callable[[T], int]):
        self._tenant_of, self._priority_of = tenant_of, priority_of
        self._queues: dict[str, list[tuple[int, int, T]]] = {}
        self._turn: dict[str, int] = {}  # when the tenant queued first or was last served
        self._ticks = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[T]:
        for queue in list(self._queues.values()):
            for _, _, item in queue:
                yield item

    def waiting(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def push(self, item: T) -> None:
        tenant = self._tenant_of(item)
        queue = self._queues.get(tenant)
        tick = next(self._ticks)
        if queue is None:
            queue = self._queues[tenant] = []
            self._turn.setdefault(tenant, tick)
        heapq.heappush(queue, (self._priority_of(item), tick, item))
        self._size += 1

    def keep(self, wanted: Callable[[T], bool]) -> None:
        """Drop every item ``wanted`` refuses (finished, aborted)."""
        for tenant, queue in list(self._queues.items()):
            kept = [entry for entry in queue if wanted(entry[2])]
            if len(kept) != len(queue):
                heapq.heapify(kept)
                self._size -= len(queue) - len(kept)
                self._set(tenant, kept)

    def clear(self) -> None:
        self._queues.clear()
        self._turn.clear()
        self._size = 0

    def next_tenant(self, running: Mapping[str, int], ui_cap: int) -> str | None:
        """Whose turn it is, given the rows each tenant holds (``running``): the fewest rows
        first, then the least recently served; UI tenants are passed over while they hold
        ``ui_cap`` rows or more together and any other tenant waits."""
        if not self._size:
            return None
        candidates = list(self._queues)
        if any(not is_ui_tenant(t) for t in candidates):
            ui_rows = sum(n for t, n in running.items() if is_ui_tenant(t))
            if ui_rows >= ui_cap:
                candidates = [t for t in candidates if not is_ui_tenant(t)]
        return min(candidates, key=lambda t: (running.get(t, 0), self._turn[t]))

    def peek(self, tenant: str) -> T:
        return self._queues[tenant][0][2]

    def pop(self, tenant: str, *, served: bool = True) -> T:
        """The tenant's first item; when ``served``, the tenant goes to the back of the turns."""
        queue = self._queues[tenant]
        item = heapq.heappop(queue)[2]
        self._size -= 1
        if served:
            self._turn[tenant] = next(self._ticks)
        self._set(tenant, queue)
        return item

    def _set(self, tenant: str, queue: list[tuple[int, int, T]]) -> None:
        if queue:
            self._queues[tenant] = queue
        else:  # a tenant with nothing waiting keeps no state (addresses are many)
            self._queues.pop(tenant, None)
            self._turn.pop(tenant, None)
