"""The worker group: N rank actors in one placement group, their rendezvous and their health.

It knows how to start, poll and tear down ranks; it does not decide what to do about a failure
(that is the controller's and the restart policy's job).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import JobSpec
from .failure import InjectedFailure
from .spares import SparePool
from .worker import Worker

# Frames that mean "this rank waits for a peer" in a hung rank's stack (it is a victim, not the cause).
_COLLECTIVE_FRAMES = ("in all_reduce", "in barrier", "in broadcast", "in all_gather", "in reduce_scatter",
                      "in recv", "in send", "in _recv", "in _wait", "in finish", "in _broadcast_loss")


class GroupFailure(RuntimeError):
    """A rank died, hung, raised, or the group could not start. ``kind``: died|hung|error|start.

    ``details``: {rank: full remote traceback or stack dump}, for events.jsonl and the rank logs.
    """

    def __init__(self, kind: str, ranks: list[int], cause: str, step: int | None = None,
                 details: dict[int, str] | None = None):
        self.kind, self.ranks, self.cause, self.step = kind, ranks, cause, step
        self.details = details or {}
        super().__init__(f"{kind} on rank(s) {ranks}: {cause}")


@dataclass
class RankHealth:
    step: int = 0
    phase: str = "starting"
    phase_s: float = 0.0
    last_advance: float = field(default_factory=time.monotonic)


class WorkerGroup:
    def __init__(self, spec: JobSpec, attempt: int, inject: InjectedFailure | None):
        self.spec, self.attempt, self.inject = spec, attempt, inject
        self.world = spec.cluster.workers
        self.actors: list[Any] = []
        self.pg = None
        self.train_refs: list[Any] = []
        self.health = [RankHealth() for _ in range(self.world)]

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, plan: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        """Place ranks, form the process group, restore the state ``plan()`` offers; every rank's result."""
        c = self.spec.cluster
        bundle = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {})}
        self.pg = placement_group([dict(bundle) for _ in range(self.world)], strategy=c.placement)
        try:
            ray.get(self.pg.ready(), timeout=c.start_timeout_s)
        except GetTimeoutError:
            raise GroupFailure(
                "start",
                list(range(self.world)),
                f"no room for {self.world} workers x {bundle} within {c.start_timeout_s:g}s "
                f"(cluster has {ray.cluster_resources()}); lower cluster.workers or add nodes",
            ) from None
        self.actors = [self._new_actor(rank) for rank in range(self.world)]
        return self._form(plan)

    def _new_actor(self, rank: int) -> Any:
        c = self.spec.cluster
        return Worker.options(
            num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                                 placement_group_bundle_index=rank),
        ).remote(self.spec, self.world, self.inject, rank=rank, attempt=self.attempt)

    def _form(self, plan: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        """A new rendezvous on rank 0, then every rank joins and restores (collectively)."""
        addr, port = self._get(self.actors[0].reserve_rendezvous.remote(), [0], "rendezvous address")
        restore = plan()
        results = self._get_all([a.setup.remote(addr, port, restore, self.attempt) for a in self.actors],
                                "process group + restore")
        steps = {r["step"] for r in results}
        if len(steps) != 1:
            raise GroupFailure("error", list(range(self.world)), f"ranks restored different steps {sorted(steps)}")
        now = time.monotonic()
        for h in self.health:
            h.step, h.last_advance, h.phase = results[0]["step"] or 0, now, "restored"
        return results

    def replace(self, failed: list[int], attempt: int, plan: Callable[[], dict[str, Any]],
                spares: SparePool | None,
                before_plan: Callable[[dict[int, dict[str, Any]]], None] | None = None) -> dict[str, Any]:
        """Replace only ``failed`` ranks; the others leave their step loop and keep their processes.

        Returns {"results": per-rank restore results, "replaced": {rank: "spare" | "cold"}, "kept_pids"}.
        Raises GroupFailure when a healthy rank does not come back (the caller restarts the group).
        """
        self.attempt = attempt
        healthy = [r for r in range(self.world) if r not in failed]
        for r in healthy:
            self.actors[r].interrupt.remote()
        for r in failed:  # a hung rank is killed here: its peers' collectives then fail at once
            try:
                ray.kill(self.actors[r], no_restart=True)
            except RayError:
                pass
        wait_s = self.spec.cluster.collective_timeout_s + 10
        ends = self._get_all([self.train_refs[r] for r in healthy], "the healthy ranks to leave their step loop",
                             healthy, timeout_s=wait_s)
        left = [r for r, end in zip(healthy, ends) if not (isinstance(end, dict) and end.get("interrupted"))]
        if left:
            raise GroupFailure("error", left, f"rank(s) {left} finished instead of pausing for the replacement")
        kept = dict(zip(healthy, self._get_all([self.actors[r].pid.remote() for r in healthy], "pids", healthy)))
        if before_plan is not None:  # e.g. store lost replicas' snapshot stripes from a healthy one
            before_plan(dict(zip(healthy, ends)))
        replaced: dict[int, str] = {}
        for r in failed:
            spare = spares.take() if spares is not None else None
            if spare is not None:
                self._get(spare.assign.remote(r, attempt), [r], f"spare to become rank {r}")
                self.actors[r], replaced[r] = spare, "spare"
            else:
                self.actors[r], replaced[r] = self._new_actor(r), "cold"
        self.train_refs = []
        return {"results": self._form(plan), "replaced": replaced, "kept_pids": kept}

    def broadcast(self, method: str, *args: Any) -> None:
        """Call ``method`` on every rank without waiting (it must be safe to call while train() runs)."""
        for a in self.actors:
            getattr(a, method).remote(*args)

    def start_training(self) -> None:
        self.train_refs = [a.train.remote() for a in self.actors]

    def pids(self) -> list[int]:
        return self._get_all([a.pid.remote() for a in self.actors], "pids")

    def shutdown(self) -> None:
        """Kill every rank (no graceful collective teardown: a hung rank would block it)."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except RayError:
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except RayError:
                pass
        self.actors, self.pg, self.train_refs = [], None, []

    # ---- health -------------------------------------------------------------------------
    def poll(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]] | None]:
        """One health round: (new metric records, new events, final results if all finished).

        Raises GroupFailure for a dead rank, a rank whose train() raised, or ranks with no
        progress for ``hang_timeout_s``.
        """
        if self._any_train_ref_failed():
            raise self._diagnose()
        timeout = max(1.0, self.spec.cluster.health_poll_s * 4)
        refs = [a.progress.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        ready_set = set(ready)
        metrics: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        now = time.monotonic()
        for rank, ref in enumerate(refs):
            if ref not in ready_set:
                continue  # unresponsive this round; the hang check below catches a long silence
            try:
                report = ray.get(ref)
            except RayActorError:
                raise self._diagnose() from None
            h = self.health[rank]
            if report["step"] > h.step:
                h.step, h.last_advance = report["step"], now
            h.phase, h.phase_s = report["phase"], report["phase_s"]
            metrics.extend(dict(m, rank=rank) for m in report["metrics"])
            events.extend(dict(e, rank=rank) for e in report["events"])
        self._check_hang(now)
        done, _ = ray.wait(self.train_refs, num_returns=len(self.train_refs), timeout=0)
        if len(done) == len(self.train_refs):
            results = self._get_all(self.train_refs, "final results")
            if any(r.get("interrupted") for r in results):
                raise self._diagnose()
            return metrics, events, results
        return metrics, events, None

    def results_within(self, timeout_s: float) -> list[dict[str, Any]] | None:
        """Every rank's train() result if all arrive within ``timeout_s`` (preemption), else None."""
        ready, pending = ray.wait(self.train_refs, num_returns=len(self.train_refs), timeout=timeout_s)
        return None if pending else self._get_all(self.train_refs, "final results")

    def _any_train_ref_failed(self) -> bool:
        done, _ = ray.wait(self.train_refs, num_returns=len(self.train_refs), timeout=0)
        for ref in done:
            try:
                ray.get(ref)
            except RayError:
                return True
        return False

    def _diagnose(self) -> GroupFailure:
        """Name the culprit: a dead rank first (its peers then fail in collectives), else a raising one."""
        probes = [a.pid.remote() for a in self.actors]
        ray.wait(probes, num_returns=len(probes), timeout=5.0)
        dead: dict[int, str] = {}
        for rank, ref in enumerate(probes):
            try:
                ray.get(ref, timeout=0)
            except RayActorError as e:
                dead[rank] = _first_line(e)
            except (GetTimeoutError, RayError):
                pass
        if dead:
            ranks = sorted(dead)
            return GroupFailure("died", ranks, dead[ranks[0]], min(self.health[r].step for r in ranks))
        errors: dict[int, str] = {}
        details: dict[int, str] = {}
        for rank, ref in enumerate(self.train_refs):
            done, _ = ray.wait([ref], timeout=0)
            if done:
                try:
                    ray.get(ref)
                except RayTaskError as e:
                    errors[rank], details[rank] = _cause_line(e), _plain(e)
                except RayError as e:
                    errors[rank], details[rank] = _first_line(e), _plain(e)
        if not errors:  # only ranks that left their loop because a collective failed: name them all
            return GroupFailure("error", list(range(self.world)), "a collective failed on every live rank "
                                "without a dead or raising rank (network?)", min(h.step for h in self.health))
        ranks = sorted(errors)
        cause = errors[ranks[0]]
        return GroupFailure("error", ranks, cause, min(self.health[r].step for r in ranks), details)

    def _check_hang(self, now: float) -> None:
        limit = self.spec.cluster.hang_timeout_s
        stalled = [r for r, h in enumerate(self.health) if h.phase not in ("finished", "paused", "preempted")
                   and now - h.last_advance > limit]
        if stalled:
            stacks = self._stacks(stalled)
            # Ranks blocked in a collective wait for the hung one; they are not the cause.
            culprits = [r for r in stalled if not _waiting_in_collective(stacks[r])] or stalled
            detail = "; ".join(
                f"rank {r} at step {self.health[r].step} in {self.health[r].phase!r} for {self.health[r].phase_s:.1f}s"
                for r in culprits
            )
            raise GroupFailure("hung", culprits, f"no step finished for > {limit:g}s: {detail}", min(
                self.health[r].step for r in culprits), {r: stacks[r] for r in culprits})

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        """Python stacks of every thread of ``ranks`` (also written to their logs), where they answer."""
        refs = {r: self.actors[r].dump_stacks.remote() for r in ranks}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=2.0)
        out = {}
        for r, ref in refs.items():
            try:
                out[r] = ray.get(ref) if ref in ready else "(did not answer within 2s: the process is stopped or stuck)"
            except RayError as e:
                out[r] = f"(could not dump stacks: {_first_line(e)})"
        return out

    # ---- waiting with names -------------------------------------------------------------
    def _get(self, ref: Any, ranks: list[int], what: str) -> Any:
        return self._get_all([ref], what, ranks)[0]

    def _get_all(self, refs: list[Any], what: str, ranks: list[int] | None = None,
                 timeout_s: float | None = None) -> list[Any]:
        ranks = ranks if ranks is not None else list(range(len(refs)))
        timeout = self.spec.cluster.start_timeout_s if timeout_s is None else timeout_s
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            late = [ranks[i] for i, r in enumerate(refs) if r in set(pending)]
            raise GroupFailure("hung", late, f"waited {timeout:g}s for {what} from rank(s) {late}")
        out = []
        for i, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except RayActorError as e:
                raise GroupFailure("died", [ranks[i]], f"during {what}: {_first_line(e)}") from None
            except RayTaskError as e:
                raise GroupFailure("error", [ranks[i]], f"during {what}: {_cause_line(e)}", details={ranks[i]: _plain(e)}) from None
        return out


def _waiting_in_collective(stack_text: str) -> bool:
    """True when the thread running the step loop sits in a collective or p2p wait."""
    for block in stack_text.split("--- thread "):
        if "_train_step" in block or "in _train" in block:
            return any(frame in block for frame in _COLLECTIVE_FRAMES)
    return False


def _plain(exc: BaseException) -> str:
    """The remote traceback Ray attached, without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


def _cause_line(e: RayTaskError) -> str:
    """``Type: message`` of the exception a remote call raised (its first line, bounded)."""
    cause = e.cause if e.cause is not None else e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:500]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray's actor-death messages put the useful part ("The actor died ... SIGKILL") after a header.
    useful = [ln for ln in lines if "died" in ln.lower() or "error" in ln.lower() or "exit" in ln.lower()]
    return (useful or lines or [type(exc).__name__])[0][:300]
