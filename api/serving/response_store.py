"""The bounded in-memory store behind ``previous_response_id`` and ``GET /v1/responses/{id}``.

A stored response belongs to whoever created it (the API key's tenant, else the client's
address: :func:`api.routes.deps.request_tenant`); any other caller is told it does not
exist, exactly as for an unknown id, so ids cannot be probed. When the count
(``THAI_RESPONSES_STORE_SIZE``) or the stored characters (``THAI_RESPONSES_STORE_MAX_CHARS``)
would exceed their bounds, the oldest entry of the owner holding the most goes first: a
client storing many responses evicts its own, not everyone else's. A restart forgets all.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    owner: str
    response: dict[str, Any]        # the Response object as sent
    history: list[dict[str, Any]]   # chat messages (no instructions) to continue from
    chars: int


class ResponseStore:
    """Bounded by count and size, the largest owner's oldest first; 0 entries: off."""

    def __init__(self, max_entries: int, max_chars: int):
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._entries: dict[str, StoredResponse] = {}
        self._by_owner: dict[str, OrderedDict[str, None]] = {}  # each owner's ids, oldest first
        self._owner_chars: dict[str, int] = {}
        self._chars = 0
        self._lock = threading.Lock()  # the UI's threads share nothing here, but be safe

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, owner: str, response: dict[str, Any],
            history: list[dict[str, Any]]) -> bool:
        """Keep it (False when it alone is larger than the size bound: not kept)."""
        if not self.enabled:
            return False
        chars = len(json.dumps(response, ensure_ascii=False)) + len(json.dumps(history, ensure_ascii=False))
        if chars > self.max_chars:
            return False
        with self._lock:
            self._remove(response_id)
            while self._entries and (len(self._entries) >= self.max_entries
                                     or self._chars + chars > self.max_chars):
                by_size = len(self._entries) < self.max_entries  # only the size is over
                largest = max(self._by_owner, key=lambda o: self._owner_chars[o] if by_size
                              else len(self._by_owner[o]))
                self._remove(next(iter(self._by_owner[largest])))
            self._entries[response_id] = StoredResponse(owner, response, history, chars)
            self._by_owner.setdefault(owner, OrderedDict())[response_id] = None
            self._owner_chars[owner] = self._owner_chars.get(owner, 0) + chars
            self._chars += chars
        return True

    def _remove(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return
        self._chars -= entry.chars
        ids = self._by_owner[entry.owner]
        del ids[response_id]
        self._owner_chars[entry.owner] -= entry.chars
        if not ids:
            del self._by_owner[entry.owner], self._owner_chars[entry.owner]

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The entry when ``owner`` created it, else None (unknown and foreign look alike)."""
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None
        return entry

    def delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            entry = self._entries.get(response_id)
            if entry is None or entry.owner != owner:
                return False
            self._remove(response_id)
        return True
