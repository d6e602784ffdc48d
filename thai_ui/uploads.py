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
- is deleted when the process exits, and folders of processes that died
  without cleaning up are deleted at the next start.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
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
                 partial_ttl_s: float = 180.0):
        base = Path(root) if root else Path(tempfile.gettempdir()) / "thai-llm-ui-uploads"
        self.root = base.expanduser().resolve()
        self.dir = self.root / str(os.getpid())
        self.quota_bytes = quota_bytes
        self.ttl_s = ttl_s
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
        return self.quota_bytes > 0 and self.usage_bytes() + incoming <= self.quota_bytes

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
        return removed
