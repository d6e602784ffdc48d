"""Where the UI's uploads live, for how long, and how much of them.

Gradio writes every upload (and every file it moves "to the cache") under
``GRADIO_TEMP_DIR`` and, left alone, keeps them forever in one shared folder
(``/tmp/gradio``) that survives restarts. Here each server process gets its
own folder, ``<root>/<pid>``, which:

- is the only place a client may name a file from (:meth:`UploadStore.resolve`;
  anything else, ``/proc/self/environ`` or the adapter's weights, is refused by
  :mod:`thai_ui.guard` before Gradio sees it);
- is shown to clients only as a relative token (``upload/<sha>/<name>``), never
  as an absolute server path (:meth:`token_for`);
- has a quota (:meth:`has_room`) and an age limit (:meth:`sweep`, run every
  minute; it also removes half-written files a broken upload left behind);
- has a quota per client too (:meth:`room_for`): every upload (and batch result)
  is recorded with the client it is for (:meth:`record`), uploads in progress
  hold what they declared (:meth:`reserve`), so one address cannot keep every
  other visitor's uploads at 507 for an hour;
- is deleted when the process exits, and folders of processes that died
  without cleaning up are deleted at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("thai.ui.uploads")

TOKEN_PREFIX = "upload/"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class UploadStore:
    def __init__(self, root: str | os.PathLike | None, *, quota_bytes: int, ttl_s: float,
                 partial_ttl_s: float = 180.0, client_quota_bytes: int | None = None):
        base = Path(root) if root else Path(tempfile.gettempdir()) / "thai-llm-ui-uploads"
        self.root = base.expanduser().resolve()
        self.dir = self.root / str(os.getpid())
        self.quota_bytes = quota_bytes
        # One client's share: never more than the whole (None: the whole, as before).
        self.client_quota_bytes = min(quota_bytes, client_quota_bytes) \
            if client_quota_bytes is not None else quota_bytes
        self.ttl_s = ttl_s
        self._owned: dict[str, dict[Path, int]] = {}  # client -> its files and their sizes
        self._reserved: dict[str, int] = {}  # client -> bytes of its uploads in progress
        self._owned_lock = threading.Lock()  # the sweeper runs in a thread
        # A file directly in the folder is Gradio's temporary file of an upload in
        # progress; older than any upload may take (the body timeout), it is debris.
        self.partial_ttl_s = partial_ttl_s

    # ------------------------------------------------------------ lifecycle
    def prepare(self) -> None:
        """Create this process's folder (empty), drop dead processes' folders, point Gradio at it."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            if entry.name.isdigit() and entry != self.dir and not _pid_alive(int(entry.name)):
                shutil.rmtree(entry, ignore_errors=True)
                log.info("removed the upload folder of a process that is gone: %s", entry.name)
        shutil.rmtree(self.dir, ignore_errors=True)  # a previous process with our pid
        self.dir.mkdir(mode=0o700)
        # Gradio reads this whenever it checks or moves a file (utils.get_upload_folder).
        os.environ["GRADIO_TEMP_DIR"] = str(self.dir)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # --------------------------------------------------------------- paths
    def resolve(self, value: str) -> Path | None:
        """The uploaded file a client means by ``value`` (a token or an absolute path): an
        existing regular file inside this process's folder, else None.

        Symbolic links and ``..`` are resolved first, so nothing outside the
        folder can be reached through them; a name the file system refuses (too
        long, say) is no file either.
        """
        if not isinstance(value, str) or not value or "\x00" in value:
            return None
        if value.startswith(TOKEN_PREFIX):
            candidate = self.dir / value[len(TOKEN_PREFIX):]
        elif os.path.isabs(value):
            candidate = Path(value)
        else:
            return None
        try:
            resolved = Path(os.path.realpath(candidate))
            if self.dir not in resolved.parents or not resolved.is_file():
                return None
        except (OSError, ValueError):
            return None
        return resolved

    def token_for(self, path: str) -> str:
        """The client-facing name of a file in the folder (absolute paths never leave)."""
        resolved = self.resolve(path)
        if resolved is None:
            raise ValueError("not an uploaded file")
        return TOKEN_PREFIX + resolved.relative_to(self.dir).as_posix()

    # ------------------------------------------------------- quota and age
    def usage_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.dir):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total

    def has_room(self, incoming: int) -> bool:
        """Room in the whole folder (uploads in progress count as what they declared)."""
        reserved = sum(self._reserved.values())
        return self.quota_bytes > 0 and self.usage_bytes() + reserved + incoming <= self.quota_bytes

    # ----------------------------------------------------------- per client
    def client_usage(self, client: str) -> int:
        """Bytes of ``client``'s files still kept (files the sweeper removed drop out)."""
        with self._owned_lock:
            owned = self._owned.get(client)
            if not owned:
                return 0
            for path in [p for p in owned if not p.is_file()]:
                del owned[path]
            return sum(owned.values())

    def room_for(self, client: str, incoming: int) -> str | None:
        """None when ``incoming`` bytes from ``client`` fit; else which quota is full:
        ``"server"`` (everyone's, checked first: no client can help it) or ``"client"``
        (this client's share)."""
        if not self.has_room(incoming):
            return "server"
        mine = self.client_usage(client) + self._reserved.get(client, 0) + incoming
        return "client" if mine > self.client_quota_bytes else None

    def client_retry_after(self, client: str, now: float | None = None) -> int:
        """Seconds until ``client``'s oldest file expires and frees its share (at least 1)."""
        now = time.time() if now is None else now
        times = []
        with self._owned_lock:
            paths = list(self._owned.get(client, {}))
        for path in paths:
            try:
                times.append(os.lstat(path).st_mtime)
            except OSError:
                pass
        if not times:
            return 60  # only uploads in progress: they end within the body timeout
        return max(1, int(min(times) + self.ttl_s - now) + 1)

    @contextlib.contextmanager
    def reserve(self, client: str, incoming: int) -> Iterator[None]:
        """Count ``incoming`` bytes for ``client`` while its upload is being written, so
        uploads sent at once cannot all pass the quotas before any of them is on disk."""
        self._reserved[client] = self._reserved.get(client, 0) + incoming
        try:
            yield
        finally:
            left = self._reserved[client] - incoming
            if left > 0:
                self._reserved[client] = left
            else:
                del self._reserved[client]

    def record(self, client: str, path: str | os.PathLike) -> None:
        """``path`` (in the folder) counts against ``client``'s share until it expires."""
        resolved = self.resolve(str(path))
        if resolved is None:
            return
        try:
            size = os.lstat(resolved).st_size
        except OSError:
            return
        with self._owned_lock:
            self._owned.setdefault(client, {})[resolved] = size

    def _forget_removed(self) -> None:
        """Drop the records of files that are gone, and of clients left with none."""
        with self._owned_lock:
            for client, owned in list(self._owned.items()):
                for path in [p for p in owned if not p.is_file()]:
                    del owned[path]
                if not owned:
                    del self._owned[client]

    def sweep(self, now: float | None = None) -> int:
        """Delete files past their age (and stale partial uploads); returns how many."""
        now = time.time() if now is None else now
        removed = 0
        for dirpath, dirnames, files in os.walk(self.dir, topdown=False):
            top = Path(dirpath) == self.dir
            for name in files:
                path = os.path.join(dirpath, name)
                try:
                    age = now - os.lstat(path).st_mtime
                    if age > (self.partial_ttl_s if top else self.ttl_s):
                        os.unlink(path)
                        removed += 1
                except OSError:
                    pass
            if not top:
                try:
                    os.rmdir(dirpath)  # only succeeds when empty
                except OSError:
                    pass
        self._forget_removed()
        return removed
