"""Warm spares: worker actors started ahead of need (torch imported, corpus open, model built).

A lost rank is replaced by a spare in the time it takes to join the new process group and
restore, instead of a process start, imports and model build. The pool refills in the
background after each take.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayError

from .config import JobSpec
from .failure import InjectedFailure
from .worker import Worker


class SparePool:
    def __init__(self, spec: JobSpec, inject: InjectedFailure | None):
        self.spec, self.inject = spec, inject
        self.target = spec.cluster.spares
        self._warming: list[tuple[Any, Any]] = []  # (actor, prewarm ref)
        self._ready: list[Any] = []
        for _ in range(self.target):
            self._start_one()

    def _start_one(self) -> None:
        c = self.spec.cluster
        actor = Worker.options(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker, max_restarts=0).remote(
            self.spec, c.workers, self.inject)
        self._warming.append((actor, actor.prewarm.remote()))

    def _collect(self) -> None:
        still = []
        for actor, ref in self._warming:
            done, _ = ray.wait([ref], timeout=0)
            if not done:
                still.append((actor, ref))
                continue
            try:
                ray.get(ref)
                self._ready.append(actor)
            except RayError:  # a spare that failed to warm up is dropped and started again
                self._start_one()
        self._warming = still

    def ready(self) -> int:
        self._collect()
        return len(self._ready)

    def take(self) -> Any | None:
        """A warmed spare (and a new one starts warming in its place), or None when none is ready."""
        self._collect()
        if not self._ready:
            return None
        self._start_one()
        return self._ready.pop(0)

    def shutdown(self) -> None:
        for actor in self._ready + [a for a, _ in self._warming]:
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass
        self._ready, self._warming = [], []
