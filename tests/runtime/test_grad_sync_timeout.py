"""A step's all-reduce gives up after its own timeout, not the group's.

At four ranks a rank that is not a ring neighbour of a lost one hears of the loss only through a
timeout: its peers that left their step loop keep their sockets open. Under the group's timeout
(60 s by default) every recovery then waited a minute before the kept ranks could re-form.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import time

import torch.multiprocessing as mp


def _rank(rank: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    from trainmem.runtime.grad_sync import all_reduce_within

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4, timeout=dt.timedelta(seconds=40))
    dist.all_reduce(torch.ones(8))
    if rank == 3:  # lost mid-step: its neighbours 0 and 2 see the socket close, rank 1 does not
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        for _ in range(3):
            t = torch.ones(200_000)
            all_reduce_within(t, 3.0).wait()  # dist.all_reduce(t) here: rank 1 waits 12 s (checked)
        out.put((rank, "finished", time.monotonic() - t0))
    except RuntimeError as e:
        out.put((rank, str(e).splitlines()[0][:80], time.monotonic() - t0))
    time.sleep(12)  # a rank that left stays alive (as a kept rank does), sockets and all


def test_a_rank_far_from_the_lost_one_gives_up_after_the_step_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(4)]
    for p in procs:
        p.start()
    try:
        got = {r: (msg, s) for r, msg, s in (out.get(timeout=60) for _ in range(3))}
    finally:
        for p in procs:
            p.kill()
    assert set(got) == {0, 1, 2} and all(msg != "finished" for msg, _ in got.values()), got
    # without the step timeout rank 1 waits until its peers' processes exit (12 s here, a minute in a job)
    assert got[1][1] < 8.0, f"rank 1 waited {got[1][1]:.1f}s for a lost peer: {got}"
