"""Failure injection (for tests and demos) and the failure policy, kept apart from the controller."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class InjectedFailure:
    rank: int
    """Rank that fails."""
    step: int
    """It fails when it starts this step (first attempt only, so the job can recover)."""
    kind: str = "kill"
    """kill: SIGKILL its own process; hang: stop making progress (sleep forever)."""

    @classmethod
    def parse(cls, text: str) -> "InjectedFailure":
        """``rank=1,step=20[,kind=kill|hang]`` → InjectedFailure; ValueError names the bad part."""
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("rank", "step", "kind"):
                raise ValueError(f"--inject-failure: {part!r} is not rank=N, step=N or kind=kill|hang")
            fields[key] = value
        missing = {"rank", "step"} - set(fields)
        if missing:
            raise ValueError(f"--inject-failure: missing {', '.join(sorted(missing))} (e.g. rank=1,step=20)")
        try:
            rank, step = int(fields["rank"]), int(fields["step"])
        except ValueError:
            raise ValueError(f"--inject-failure: rank and step must be integers, got {text!r}") from None
        kind = fields.get("kind", "kill")
        if kind not in ("kill", "hang") or rank < 0 or step < 1:
            raise ValueError(f"--inject-failure: need rank >= 0, step >= 1, kind kill|hang; got {text!r}")
        return cls(rank=rank, step=step, kind=kind)


@dataclass(frozen=True)
class Decision:
    """What to do about a failure: ``action`` is restart | stop, ``reason`` says why (for events and the user)."""

    action: str
    reason: str


@dataclass
class FailurePolicy:
    """Decides, from the failure history, whether the group restarts (as Ray Train's FailurePolicy does).

    A failure that cannot be fixed by running again stops at once: the group could not start, no
    checkpoint is restorable, or the same error recurred at the same step after a restart (a
    deterministic bug or bad data). Otherwise restart, up to ``max_restarts``.
    """

    max_restarts: int
    restarts: int = 0

    def decide(self, history: list[dict], can_replace: tuple[bool, str] = (False, "")) -> Decision:
        """``history``: failure_detected records so far, newest last (kind, cause, step, during).

        ``can_replace``: (whether the engine and settings allow replacing lost ranks alone, why not).
        """
        last = history[-1]
        if last["kind"] in ("start", "restore"):
            return Decision("stop", "cannot start" if last["kind"] == "start" else "no checkpoint can be restored")
        if last["kind"] == "error" and len(history) > 1:
            prev = history[-2]
            if prev["kind"] == "error" and prev["cause"] == last["cause"] and prev["step"] == last["step"]:
                return Decision("stop", "the same error at the same step after a restart: not transient")
        if self.restarts >= self.max_restarts:
            return Decision("stop", f"{self.restarts} restarts used (cluster.max_restarts={self.max_restarts})")
        n = f"{self.restarts + 1} of {self.max_restarts}"
        allowed, why_not = can_replace
        if last["kind"] in ("died", "hung") and last.get("during") != "replacement" and allowed:
            return Decision("replace", f"recovery {n}: replace rank(s) {last.get('ranks')}; healthy ranks keep running")
        why = ("a rank raised: every rank restarts" if last["kind"] == "error" else
               "the last replacement failed" if last.get("during") == "replacement" else why_not)
        return Decision("restart", f"recovery {n}: restart the group ({why})")

    def record_restart(self) -> int:
        self.restarts += 1
        return self.restarts
