"""Gradient averaging over a data-parallel group whose summation order is a function of the model alone.

DDP rebuilds its buckets after the first backward of a process, so a rank restarted mid-run
reduces its first steps with the initial bucket layout while a long-running one uses the rebuilt
layout. Ring all-reduce sums each element in an order set by its position in the bucket; with
three or more ranks (a+b)+c differs from a+(b+c) in the last bit, and a recovered run drifts
from the uninterrupted one. Here buckets are fixed at construction from the parameter list
(reverse order, the order backward produces them), so every process, at any age, adds the same
numbers in the same order.

Buckets are launched asynchronously as soon as every gradient in them is accumulated (hooks),
strictly in bucket order so every rank issues the same collective sequence, and waited for after
backward. Row-sparse gradients (``nn.Embedding(sparse=True)`` / ``EmbeddingBag``) are reduced
after the dense ones, in parameter order.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

_DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


def sparse_grad_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that receive sparse gradients (sparse embedding tables)."""
    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse:
            out.add(id(m.weight))
    return out


def all_reduce_within(tensor: torch.Tensor, timeout_s: float, group=None) -> dist.Work:
    """An asynchronous SUM all-reduce whose operation itself gives up after ``timeout_s``.

    ``dist.all_reduce`` runs under the group's timeout, and gloo's waits end only then or when a
    peer's socket closes: a peer that left its step loop keeps its sockets open (destroying or
    aborting its group does not close them while an operation was pending), so a rank not adjacent
    to a lost one would wait out the whole group timeout before it could be kept for recovery.
    """
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    opts.asyncOp = True
    opts.timeout = timedelta(seconds=timeout_s)
    return (group if group is not None else dist.group.WORLD).allreduce([tensor], opts)


class BucketedAllReduce:
    """Averages ``.grad`` of ``params`` over ``group`` in fixed buckets; call :meth:`finish` after backward."""

    def __init__(self, params: list[nn.Parameter], *, sparse: set[int] = frozenset(), group=None,
                 bucket_bytes: int = _DEFAULT_BUCKET_BYTES, timeout_s: float = 60.0, hooks: bool = True):
        """``hooks=False``: buckets start only at :meth:`launch` / :meth:`finish` (a pipeline stage
        accumulates over microbatches, so a gradient's first arrival is not its last)."""
        self.group = group
        self.world = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout_s)
        trainable = [p for p in params if p.requires_grad]
        self.sparse = [p for p in trainable if id(p) in sparse]
        dense = [p for p in reversed(trainable) if id(p) not in sparse]
        self.buckets: list[list[nn.Parameter]] = []
        size = bucket_bytes + 1
        for p in dense:
            nbytes = p.numel() * p.element_size()
            if size + nbytes > bucket_bytes and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in dense] if hooks else []
        self._reset()

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._inflight: list[tuple[int, torch.Tensor, dist.Work]] = []

    def _on_grad(self, p: nn.Parameter) -> None:
        i = self._bucket_of[id(p)]
        self._ready[i] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, i: int) -> None:
        grads = []
        for p in self.buckets[i]:
            if p.grad is None:  # unused this step: contributes zeros, so every rank reduces the same layout
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads).div_(self.world)
        self._inflight.append((i, flat, all_reduce_within(flat, self.timeout.total_seconds(), self.group)))

    def launch(self) -> None:
        """Start every bucket not started yet, in bucket order (asynchronous)."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1

    def finish(self) -> None:
        """Launch buckets whose gradients never arrived, wait for all, write the averages back."""
        self.launch()
        try:
            for i, flat, work in self._inflight:
                work.wait(self.timeout)
                offset = 0
                for p in self.buckets[i]:
                    n = p.numel()
                    p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                    offset += n
            for p in self.sparse:
                if p.grad is None:
                    p.grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), p.new_empty(0, *p.shape[1:]),
                                                     p.shape)
                grad = p.grad.coalesce().div_(self.world)
                all_reduce_within(grad, self.timeout.total_seconds(), self.group).wait(self.timeout)
                p.grad = grad.coalesce()
        finally:
            self._reset()

    def abandon(self) -> None:
        """Forget an interrupted backward's buckets (their group is gone)."""
        self._reset()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
