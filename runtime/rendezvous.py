"""The process group's rendezvous, bound to the node's cluster address and never to every interface.

``init_process_group(init_method="tcp://...")`` makes rank 0 start a TCPStore that listens on
``*:port`` with no authentication, and gloo picks its interface from the hostname. Here rank 0
binds the listening socket itself (``master_listen_fd``) on the address Ray gave its node
(127.0.0.1 for an embedded cluster), keeps it open from the moment the port is chosen until the
store owns it (no window in which another process can take the port), and gloo/NCCL are told the
interface that carries that address.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import psutil
import torch.distributed as dist


def interface_of(ip: str) -> str | None:
    """Name of the network interface holding ``ip`` (``lo`` for 127.0.0.1), or None."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def pin_collectives_to(ip: str) -> None:
    """Make gloo and NCCL open their sockets on ``ip``'s interface (unless the user chose one)."""
    iface = interface_of(ip)
    if iface is None:
        return
    os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


class RendezvousListener:
    """Rank 0's listening socket for the TCPStore: bound to ``ip`` on a free port, held until used."""

    def __init__(self, ip: str):
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, 0))
        self.sock.listen(128)
        self.ip, self.port = ip, self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def init_group(*, backend: str, ip: str, port: int, rank: int, world: int, timeout_s: float,
               listener: RendezvousListener | None = None) -> dist.TCPStore:
    """Form the default process group through a TCPStore at ``ip:port`` (rank 0 passes its listener)."""
    pin_collectives_to(ip)
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        if listener is None:
            raise ValueError("rank 0 must pass the RendezvousListener it reserved")
        # The store owns the descriptor from here on; detaching keeps Python from closing it twice.
        store = dist.TCPStore(ip, port, world, True, timeout, wait_for_workers=False,
                              master_listen_fd=listener.sock.detach())
    else:
        store = dist.TCPStore(ip, port, world, False, timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return store


def is_collective_failure(exc: BaseException) -> bool:
    """True when ``exc`` says a peer of the process group is gone (reset, closed, timed out), not a bug here.

    gloo raises a plain RuntimeError naming its transport; the store and NCCL raise torch's DistError.
    """
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("gloo" in text or "Connection reset by peer" in text
                                              or "Connection closed by peer" in text)
