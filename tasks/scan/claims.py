"""Exactly-once bookkeeping of the scan service: claims, done records and the drop-folder ledger.

Two scheduled discovery runs may overlap (a slow scan outlasts the interval, or two runners serve
the deployment). Before a model is scanned its key is *claimed* by creating
`<state>/claims/<key>.claim` with O_CREAT | O_EXCL, which the filesystem grants to exactly one
caller; the loser skips the model. When the verdict is in MLflow, `<state>/done/<key>.json` is
written (atomically) and the claim removed; a scan that failed (say, the MLflow server went down)
only removes the claim, so the next run scans the model again. A claim left by a crashed process
(its pid is gone, on this host) or older than `timeout_s` is stale and may be taken over: it is
first renamed away (atomic, one winner), then claimed again with O_EXCL.

The claims folder must be on one filesystem shared by every process that scans (a local disk for
one machine; NFS or similar with a Dask cluster whose workers claim). `<state>` here is the state
folder's part for one tracking store (tasks.scan.service.store_folder).

The ledger (`<state>/ledger.jsonl`) records each drop-folder file pair once processed: path, size,
mtime, key and verdict, so a later discovery skips it without hashing it again. The drop folder
itself is only ever read.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.io import read_json, write_json


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ClaimStore:
    """Claims (in progress) and done records (verdict recorded), keyed by a model's sha256."""

    root: Path
    timeout_s: float = 3600.0

    @property
    def claims(self) -> Path:
        return Path(self.root) / "claims"

    @property
    def finished(self) -> Path:
        return Path(self.root) / "done"

    def _claim_path(self, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"claim keys are lowercase hex digests, got {key!r}")
        return self.claims / f"{key}.claim"

    def acquire(self, key: str, owner: str = "") -> bool:
        """Claim `key`; True for exactly one of any number of concurrent callers."""
        path = self._claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "time": time.time(), "owner": owner}).encode()
        for _ in range(2):  # second try only after taking over a stale claim
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_stale(path):
                    return False
                continue
            with os.fdopen(fd, "wb") as fh:
                fh.write(body)
            return True
        return False

    def acquire_waiting(self, key: str, owner: str = "", poll_s: float = 2.0) -> bool:
        """Claim `key`, waiting while another live run holds it; False if not won within
        `timeout_s` (a claim that old is stale and taken over, so this is rare)."""
        deadline = time.monotonic() + self.timeout_s
        while not self.acquire(key, owner):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True

    def holder(self, key: str) -> dict[str, Any]:
        """Who holds the claim of `key` ({} if nobody): pid, host, time, owner (a flow run)."""
        try:
            return json.loads(self._claim_path(key).read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _take_over_stale(self, path: Path) -> bool:
        """Rename a stale claim away (one winner); False if the claim is live or gone."""
        try:
            info = json.loads(path.read_text() or "{}")
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return False  # vanished or half-written by its owner: treat as live
        dead = info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0)))
        if not dead and age < self.timeout_s:
            return False
        try:
            os.rename(path, path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}"))
        except FileNotFoundError:
            return False
        return True

    def release(self, key: str) -> None:
        """Drop the claim (the model will be discovered again)."""
        self._claim_path(key).unlink(missing_ok=True)

    def held(self) -> list[str]:
        """Keys claimed right now."""
        return sorted(p.name.removesuffix(".claim") for p in self.claims.glob("*.claim"))

    def done(self, key: str) -> dict[str, Any] | None:
        """The done record of `key`, or None if it was never scanned to the end."""
        path = self.finished / f"{key}.json"
        return read_json(path) if path.is_file() else None

    def finish(self, key: str, record: dict[str, Any]) -> None:
        """Write the done record (atomically), then release the claim."""
        write_json(self.finished / f"{key}.json", record)
        self.release(key)


@dataclass(frozen=True)
class Ledger:
    """Append-only JSON-lines record of processed drop-folder files."""

    path: Path

    def append(self, entry: dict[str, Any]) -> None:
        """One line, one O_APPEND write (atomic between processes on a local filesystem)."""
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (a torn last line is skipped)."""
        if not Path(self.path).is_file():
            return []
        out = []
        for line in Path(self.path).read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def seen(self) -> dict[tuple[str, ...], str]:
        """(name, size, mtime_ns) of each recorded file -> its key, for skipping without a hash."""
        return {tuple(f): e["key"] for e in self.entries() for f in e.get("files", [])}
