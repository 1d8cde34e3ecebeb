"""One consolidation at a time, cluster-wide: a lease in the memory store.

The lease is a key-value record (``lease.<job>``: owner, host, pid, expiry) written by a store
transaction, so taking it is a compare-and-swap every process sees. A holder renews it from a
heartbeat thread every third of its TTL; the consolidation's commit re-checks it inside the same
transaction, so a run whose lease lapsed and was taken over cannot commit. A lease whose holder
died is free at once when that holder ran on this host (its pid is gone), else at expiry.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..store import MemoryStore, Transaction


class LeaseHeld(RuntimeError):
    """Another run holds the lease; ``holder`` is its record."""

    def __init__(self, holder: dict[str, Any]):
        left = holder["expires"] - time.time()
        super().__init__(f"consolidation lease held by {holder['owner']} (pid {holder['pid']} on {holder['host']}, "
                         f"expires in {left:.0f}s)")
        self.holder = holder


class LeaseLost(RuntimeError):
    """This run's lease lapsed and another run took it: the commit is refused."""


def _alive_here(record: dict[str, Any]) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # cannot tell from here: wait for expiry
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    def __init__(self, store: MemoryStore, job: str, kind: str, ttl_s: float = 60.0):
        self.store, self.ttl_s = store, ttl_s
        self.key = f"lease.{job}"
        self.owner = f"{kind}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "acquired": now,
                "expires": now + self.ttl_s}

    @staticmethod
    def holder(kv: dict[str, str], key: str) -> dict[str, Any] | None:
        """The live lease record under ``key``, or None if free (absent, expired or its holder died)."""
        raw = kv.get(key)
        if not raw:
            return None
        record = json.loads(raw)
        if record["expires"] < time.time() or not _alive_here(record):
            return None
        return record

    def acquire(self) -> "Lease":
        with self.store.transaction() as txn:
            cur = self.holder(txn.kv, self.key)
            if cur is not None and cur["owner"] != self.owner:
                raise LeaseHeld(cur)
            txn.kv[self.key] = json.dumps(self._record())
        self._thread = threading.Thread(target=self._heartbeat, name="consolidation-lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                with self.store.transaction() as txn:
                    cur = json.loads(txn.kv.get(self.key) or "{}")
                    if cur.get("owner") != self.owner:
                        self.lost = True
                        return
                    txn.kv[self.key] = json.dumps({**cur, "expires": time.time() + self.ttl_s})
            except Exception:  # a store hiccup: the next beat retries; the commit check decides
                continue

    def check(self, txn: Transaction) -> None:
        """Inside the commit transaction: the lease must still be ours."""
        cur = json.loads(txn.kv.get(self.key) or "{}")
        if self.lost or cur.get("owner") != self.owner:
            raise LeaseLost(f"the consolidation lease passed to {cur.get('owner', 'nobody')}; this run's work is "
                            "dropped (it will be redone)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.store.transaction() as txn:
            cur = json.loads(txn.kv.get(self.key) or "{}")
            if cur.get("owner") == self.owner:
                del txn.kv[self.key]

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
