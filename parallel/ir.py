"""Pipeline schedule IR: per rank, an ordered list of actions.

An action names a kind, a global pipeline stage (0..S-1, S = p·v) and a microbatch. Where a stage
lives is the schedule's *placement*: ``placement[rank]`` lists that rank's stages in chunk order, so
the chunk of an action is the stage's index in its rank's list.

Text form: ``{stage}{KIND}{mb}`` (e.g. ``3BW7``), one rank per CSV row — the same shape as
``torch.distributed.pipelining``'s CSV, whose kinds map as F→F, B (input grad)→I, W→W, BW→B.
Send/recv actions carry the stage that *owns the tensor on this rank*: SEND_F/SEND_B name the
sending stage, RECV_F/RECV_B the receiving stage (as in torch).
"""

from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass, field, replace
from enum import Enum


class DeadlockError(RuntimeError):
    """No rank can make progress although actions remain."""


class Kind(str, Enum):
    F = "F"
    """Forward of one stage for one microbatch; stashes its saved activations."""
    B = "B"
    """Backward for the stage input only (zero-bubble split); the stash stays until W."""
    W = "W"
    """Backward for the stage weights (zero-bubble split); frees the stash."""
    BW = "BW"
    """Fused backward (input and weights); frees the stash."""
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"
    OFFLOAD = "OFFLOAD"
    """Copy a stash to host memory; it stops counting as device-resident."""
    RELOAD = "RELOAD"
    """Bring an offloaded stash back before its backward."""


COMPUTE = frozenset({Kind.F, Kind.B, Kind.W, Kind.BW})
COMM = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})
BACKWARD = frozenset({Kind.B, Kind.BW})

_TEXT = re.compile(r"^(\d+)(F|BW|B|W|SEND_F|RECV_F|SEND_B|RECV_B|OFFLOAD|RELOAD)(\d+)$")
_TO_TORCH = {"F": "F", "B": "I", "W": "W", "BW": "B"}
_FROM_TORCH = {v: k for k, v in _TO_TORCH.items()}


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: Kind
    mb: int
    chunk: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.stage}{self.kind.value}{self.mb}"

    @staticmethod
    def parse(text: str, chunk: int = 0) -> "Action":
        hit = _TEXT.match(text.strip())
        if not hit:
            raise ValueError(f"action={text!r} is not STAGE KIND MB (e.g. '3BW7'; kinds {', '.join(k.value for k in Kind)})")
        return Action(int(hit.group(1)), Kind(hit.group(2)), int(hit.group(3)), chunk)


def loop_placement(p: int, v: int) -> list[list[int]]:
    """Interleaved placement: stage s on rank s % p (Megatron's virtual stages)."""
    return [[c * p + r for c in range(v)] for r in range(p)]


def v_placement(p: int) -> list[list[int]]:
    """V-shape placement (v=2): rank r holds stage r and stage 2p-1-r, so rank 0 holds first and last."""
    return [[r, 2 * p - 1 - r] for r in range(p)]


@dataclass
class Schedule:
    name: str
    p: int
    m: int
    placement: list[list[int]]
    """placement[rank] = that rank's stages in chunk order."""
    ranks: list[list[Action]]
    """ranks[rank] = the ordered actions that rank runs in one step."""

    @property
    def v(self) -> int:
        return len(self.placement[0])

    @property
    def n_stages(self) -> int:
        return self.p * self.v

    @property
    def split_bw(self) -> bool:
        return any(a.kind is Kind.W for acts in self.ranks for a in acts)

    def rank_of(self, stage: int) -> int:
        return self._owner()[stage][0]

    def chunk_of(self, stage: int) -> int:
        return self._owner()[stage][1]

    def _owner(self) -> dict[int, tuple[int, int]]:
        return _owner_map(tuple(tuple(stages) for stages in self.placement))

    def act(self, kind: Kind, stage: int, mb: int) -> Action:
        return Action(stage, kind, mb, self.chunk_of(stage))

    def with_ranks(self, ranks: list[list[Action]], name: str | None = None) -> "Schedule":
        return replace(self, ranks=ranks, name=name or self.name)

    def to_text(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(self.ranks))

    def __str__(self) -> str:
        return self.to_text()


@functools.lru_cache(maxsize=256)
def _owner_map(placement: tuple[tuple[int, ...], ...]) -> dict[int, tuple[int, int]]:
    return {s: (r, c) for r, stages in enumerate(placement) for c, s in enumerate(stages)}


def to_csv(schedule: Schedule, torch_names: bool = False) -> str:
    """One row per rank; with ``torch_names`` compute kinds use torch's letters (F, I, W, B)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for acts in schedule.ranks:
        row = []
        for a in acts:
            kind = _TO_TORCH.get(a.kind.value, a.kind.value) if torch_names else a.kind.value
            row.append(f"{a.stage}{kind}{a.mb}")
        writer.writerow(row)
    return out.getvalue()


def from_csv(text: str, *, name: str, m: int, placement: list[list[int]], torch_names: bool = False) -> Schedule:
    """Parse ``to_csv`` output (ours or, with ``torch_names``, torch's compute letters)."""
    owner = {s: c for stages in placement for c, s in enumerate(stages)}
    ranks: list[list[Action]] = []
    for row_no, row in enumerate(csv.reader(io.StringIO(text))):
        acts = []
        for cell in (c.strip() for c in row):
            if not cell:
                continue
            if torch_names:
                hit = re.match(r"^(\d+)([A-Z_]+)(\d+)$", cell)
                if hit and hit.group(2) in _FROM_TORCH:
                    cell = f"{hit.group(1)}{_FROM_TORCH[hit.group(2)]}{hit.group(3)}"
            try:
                a = Action.parse(cell)
            except ValueError as exc:
                raise ValueError(f"row {row_no}: {exc}") from None
            if a.stage not in owner:
                raise ValueError(f"row {row_no}: action={cell!r} names stage {a.stage}, not in the placement")
            acts.append(replace(a, chunk=owner[a.stage]))
        ranks.append(acts)
    if len(ranks) != len(placement):
        raise ValueError(f"csv has {len(ranks)} rows but the placement has {len(placement)} ranks (one row per rank)")
    return Schedule(name=name, p=len(placement), m=m, placement=placement, ranks=ranks)
