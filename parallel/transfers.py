"""The tensors that sit between stages during a step, and what they cost.

Three kinds, none of them saved activations (the stash ledger counts those): a stage output or
input gradient produced here and not yet handed on (to a send or to the next stage on this rank),
a send in flight (its buffer must live until the request completes), and a posted receive whose
buffer the consumer has not taken yet. Each is counted once per storage while it is held, so
``peak_bytes`` is the step's peak of memory the saved-activation meter does not see.

When is a send complete? NCCL works report it (``is_completed``); gloo ones only inside
``wait()``. Both ranks of a pair post their operations in one order (``comm_plan``), so once a
receive from peer q has its data, q had posted the receives of every send we posted to q before
that receive: those sends are matched and finish without q, and waiting for them then is short
and cannot deadlock. ``take`` does that, so sent buffers are let go as the step goes, not at its end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


class Transfers:
    def __init__(self, wait: Callable[[Any, str], None]) -> None:
        self._wait = wait
        """wait(work, what): waits with the executor's timeout, raises PipelineError naming what."""
        self._held: dict[tuple, torch.Tensor] = {}
        self._sends: dict[int, list[tuple[int, Any, torch.Tensor, str]]] = {}
        """peer -> sends in flight as (number among our sends to that peer, work, buffer, what)"""
        self._n_sent: dict[int, int] = {}
        self._inbox: dict[tuple, tuple[int, int, Any, torch.Tensor, str]] = {}
        """key -> (peer, sends to that peer posted before this receive, work, buffer, what)"""
        self.bytes = 0
        self.peak_bytes = 0

    def _add(self, t: torch.Tensor) -> None:
        self.bytes += _storage_bytes(t)
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    # stage outputs / input gradients waiting for their hand-over
    def hold(self, key: tuple, t: torch.Tensor) -> None:
        self._held[key] = t
        self._add(t)

    def holds(self, key: tuple) -> bool:
        return key in self._held

    def hand_over(self, key: tuple) -> torch.Tensor:
        t = self._held.pop(key)
        self.bytes -= _storage_bytes(t)
        return t

    # sends
    def sent(self, peer: int, work, t: torch.Tensor, what: str) -> None:
        """Keep ``t`` alive until ``work`` completes."""
        n = self._n_sent.get(peer, 0)
        self._n_sent[peer] = n + 1
        self._sends.setdefault(peer, []).append((n, work, t, what))
        self._add(t)

    def reap(self) -> None:
        """Drop the buffers of sends that report completion (NCCL; gloo reports it only in wait)."""
        for peer, flight in self._sends.items():
            self._sends[peer] = [s for s in flight if not (s[1].is_completed() and self._finish(s))]

    def _finish(self, send) -> bool:
        _, work, t, what = send
        self._wait(work, what)  # returns at once for a completed send; raises if it failed
        self.bytes -= _storage_bytes(t)
        return True

    def _settle(self, peer: int, before: int) -> None:
        """Finish the sends to ``peer`` posted before a receive from it that has its data."""
        flight = self._sends.get(peer, [])
        done = [s for s in flight if s[0] < before]
        for s in done:
            self._finish(s)
        self._sends[peer] = flight[len(done):]

    def drain(self) -> None:
        """Wait for every send still in flight (end of step)."""
        for peer, flight in self._sends.items():
            for s in flight:
                self._finish(s)
        self._sends = {}

    # receives
    def posted(self, key: tuple, peer: int, work, buf: torch.Tensor, what: str) -> None:
        self._inbox[key] = (peer, self._n_sent.get(peer, 0), work, buf, what)
        self._add(buf)

    def take(self, key: tuple) -> torch.Tensor | None:
        """Wait for the receive posted under ``key`` and hand its buffer to the consumer."""
        posted = self._inbox.pop(key, None)
        if posted is None:
            return None
        peer, before, work, buf, what = posted
        self._wait(work, what)
        self.bytes -= _storage_bytes(buf)
        self._settle(peer, before)
        return buf

    def leftover(self) -> list[str]:
        return [f"{k}" for k in self._held] + [p[-1] for p in self._inbox.values()]
