"""Failure injection (for tests and demos) and the restart policy, kept apart from the controller."""

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


@dataclass
class RestartPolicy:
    """Whole-group restart, bounded by ``max_restarts`` (as Ray Train's FailureConfig)."""

    max_restarts: int
    restarts: int = 0

    def should_restart(self) -> bool:
        return self.restarts < self.max_restarts

    def record_restart(self) -> int:
        self.restarts += 1
        return self.restarts
