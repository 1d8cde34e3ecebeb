"""Named kill points for fault tests.

``TRAINMEM_KILL_AT=name[,name...]`` (or ``--inject-kill`` on ``trainmem consolidate``) makes the
process SIGKILL itself when it reaches one of those points, so tests kill at an exact place
(before a plan, inside a commit, ...) instead of guessing with sleeps. Unset, a point costs one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "TRAINMEM_KILL_AT"

POINTS = {
    "consolidate.before_plan": "after the lease is taken, before anything is planned",
    "consolidate.distill": "half-way through distillation",
    "consolidate.after_commit": "after the commit is durable, before the lease is released",
    "store.commit:consolidation": "inside the consolidation's commit: half its frame written and synced",
}


def armed(name: str) -> bool:
    return name in os.environ.get(ENV, "").split(",")


def kill_point(name: str) -> None:
    if armed(name):
        os.kill(os.getpid(), signal.SIGKILL)
