"""The worker group: N rank actors in one placement group, their rendezvous and their health.

It knows how to start, poll and tear down ranks; it does not decide what to do about a failure
(that is the controller's and the restart policy's job).
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import trainmem

from .config import ClusterConfig, JobSpec
from .failure import InjectedFailure
from .worker import Worker


class GroupFailure(RuntimeError):
    """A rank died, hung, raised, or the group could not start. ``kind``: died|hung|error|start.

    ``details``: {rank: full remote traceback or stack dump}, for events.jsonl and the rank logs.
    """

    def __init__(self, kind: str, ranks: list[int], cause: str, step: int | None = None,
                 details: dict[int, str] | None = None):
        self.kind, self.ranks, self.cause, self.step = kind, ranks, cause, step
        self.details = details or {}
        super().__init__(f"{kind} on rank(s) {ranks}: {cause}")


class ClusterUnavailable(RuntimeError):
    """The Ray cluster named by ``cluster.address`` cannot be joined; the message says why and what to do."""


def connect_ray(cfg: ClusterConfig) -> bool:
    """Join ``cfg.address`` or start an embedded cluster; returns True if this call started Ray."""
    if ray.is_initialized():
        return False
    common = dict(namespace="trainmem", log_to_driver=False, logging_level="ERROR", configure_logging=True)
    if cfg.address:
        _probe_address(cfg.address)
        _require_cluster_mode(cfg.address)
        try:
            ray.init(address=cfg.address, **common)
        except (ConnectionError, RuntimeError) as e:
            auth = "token" in str(e).lower() or "auth" in str(e).lower()
            fix = (
                "the cluster uses token auth: export RAY_AUTH_MODE=token and make its token available "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
                if auth
                else "check that a Ray head runs there (ray status --address ...) and the port is reachable"
            )
            raise ClusterUnavailable(f"cannot join Ray at cluster.address={cfg.address!r}: {fix}") from None
    else:
        _require_loopback()
        need = int(cfg.workers * cfg.cpus_per_worker + 0.999)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, **common)
    return True


def _require_loopback() -> None:
    """An embedded cluster must listen on 127.0.0.1 only; Ray decides that when it is imported."""
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise ClusterUnavailable(
            "an embedded Ray cluster would listen on this machine's network address: Ray was imported with "
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER set to enable clusters (fix: unset it, or import trainmem before ray)")


def _require_cluster_mode(address: str) -> None:
    """Joining a cluster on another address needs Ray's cluster mode, which is chosen at import."""
    from ray._private import ray_constants

    if not ray_constants.ENABLE_RAY_CLUSTER and not trainmem.is_loopback_address(address):
        raise ClusterUnavailable(
            f"cluster.address={address!r} is another machine, but Ray was imported in loopback-only mode "
            "(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, trainmem's default) (fix: export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 "
            "before starting Python, or use `trainmem launch`, which sets it for jobs with an address)")


def _probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the address, where ray.init would retry for minutes."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnavailable(f"cluster.address={address!r} is not host:port, ray://host:port or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterUnavailable(
            f"cannot join Ray at cluster.address={address!r}: nothing answers there within {timeout_s:g}s ({e}); "
            "start the head (ray start --head) or fix the address"
        ) from None


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
    def start(self, restore: dict[str, Any]) -> list[dict[str, Any]]:
        """Place ranks, form the process group, restore state; every rank's restore result."""
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
        self.actors = [
            Worker.options(
                num_cpus=c.cpus_per_worker,
                num_gpus=c.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank
                ),
                max_restarts=0,
            ).remote(self.spec, rank, self.world, self.attempt, self.inject)
            for rank in range(self.world)
        ]
        addr, port = self._get(self.actors[0].reserve_rendezvous.remote(), [0], "rendezvous address")
        results = self._get_all([a.setup.remote(addr, port, restore) for a in self.actors], "process group + restore")
        steps = {r["step"] for r in results}
        if len(steps) != 1:
            raise GroupFailure("error", list(range(self.world)), f"ranks restored different steps {sorted(steps)}")
        now = time.monotonic()
        for h in self.health:
            h.step, h.last_advance = results[0]["step"] or 0, now
        return results

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
            return metrics, events, self._get_all(self.train_refs, "final results")
        return metrics, events, None

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
        ranks = sorted(errors) or list(range(self.world))
        cause = errors.get(ranks[0], "a rank failed without a recorded cause")
        return GroupFailure("error", ranks, cause, min(self.health[r].step for r in ranks), details)

    def _check_hang(self, now: float) -> None:
        limit = self.spec.cluster.hang_timeout_s
        stalled = [r for r, h in enumerate(self.health) if h.phase != "finished" and now - h.last_advance > limit]
        if stalled:
            detail = "; ".join(
                f"rank {r} at step {self.health[r].step} in {self.health[r].phase!r} for {self.health[r].phase_s:.1f}s"
                for r in stalled
            )
            raise GroupFailure("hung", stalled, f"no step finished for > {limit:g}s: {detail}", min(
                self.health[r].step for r in stalled), self._stacks(stalled))

    def _stacks(self, ranks: list[int]) -> dict[int, str]:
        """Python stacks of every thread of ``ranks`` (also written to their logs), where they answer."""
        refs = {r: self.actors[r].dump_stacks.remote() for r in ranks}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)
        out = {}
        for r, ref in refs.items():
            try:
                out[r] = ray.get(ref) if ref in ready else "(did not answer within 5s)"
            except RayError as e:
                out[r] = f"(could not dump stacks: {_first_line(e)})"
        return out

    # ---- waiting with names -------------------------------------------------------------
    def _get(self, ref: Any, ranks: list[int], what: str) -> Any:
        return self._get_all([ref], what, ranks)[0]

    def _get_all(self, refs: list[Any], what: str, ranks: list[int] | None = None) -> list[Any]:
        ranks = ranks if ranks is not None else list(range(len(refs)))
        timeout = self.spec.cluster.start_timeout_s
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
