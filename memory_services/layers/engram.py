"""Hashed n-gram memory (Engram-style conditional memory) with host-memory tables and prefetch.

For each position and each n-gram order, the last n token ids are mixed into one 64-bit value
and hashed by ``heads_per_order`` independent multiplicative hashes into per-head tables that
live in host memory. Addresses depend only on input ids, so a prefetch thread computes them and
gathers the rows a batch needs while the previous batch runs (pinned + non-blocking copy on
CUDA). A context gate (hidden state · projected memory) decides how much of the memory to add.

The tables are one parameter (in ``state_dict``, so checkpoints keep them). Inside a model
(``[model] ngram_memory = true``) ``rows(ids)`` reads them through ``GatherRows``: the gradient is
the active rows only, trained by the layer's row-sparse Adam like product-key values. The
prefetch path (``gather`` ahead of time, ``update_rows``) trains the same rows by SGD on the host.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import EngramConfig
from .product_key import GatherRows, active_rows

_MIX = 0x100000001B3  # FNV-64 prime: combines ids of one n-gram
_MASK61 = (1 << 61) - 1


class HashedNgramMemory(nn.Module):
    def __init__(self, cfg: EngramConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.n_heads = len(cfg.orders) * cfg.heads_per_order
        gen = torch.Generator().manual_seed(seed)
        # Odd multipliers below 2**61: deterministic per (seed, head), so addresses are reproducible.
        mult = torch.randint(1, 1 << 60, (self.n_heads,), generator=gen, dtype=torch.int64) * 2 + 1
        self.register_buffer("multipliers", mult, persistent=True)
        if cfg.d_model <= 0:
            raise ValueError(f"d_model={cfg.d_model} must be set (> 0) before building the memory")
        tables = torch.randn(self.n_heads * cfg.table_rows, cfg.row_dim, generator=gen) * cfg.row_dim**-0.5
        # Row (head, r) of the per-head tables is row head * table_rows + r of this one parameter. An
        # Embedding(sparse=True) holds it so DistributedDataParallel expects its sparse gradient.
        self.table = nn.Embedding(*tables.shape, sparse=True, _weight=tables.pin_memory() if torch.cuda.is_available() else tables)
        # Updates since a prefetch gathered its rows: (update number, flat row ids) so a prefetched
        # batch can patch exactly the rows that went stale instead of re-gathering everything.
        self.update_count = 0
        self._updates: collections.deque[tuple[int, torch.Tensor]] = collections.deque(maxlen=64)
        width = self.n_heads * cfg.row_dim
        self.key = nn.Linear(width, cfg.d_model, bias=False)
        self.value = nn.Linear(width, cfg.d_model, bias=False)

    def addresses(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T, n_heads) row addresses; positions before the start pad with 0."""
        ids = ids.to("cpu", torch.int64) + 1  # 0 is the padding id
        out = []
        for n in self.cfg.orders:
            acc = torch.zeros_like(ids)
            for j in range(n):
                shifted = F.pad(ids, (j, 0))[:, : ids.shape[1]]
                acc = (acc * _MIX + shifted) & _MASK61
            for h in range(self.cfg.heads_per_order):
                m = self.multipliers[len(out)]
                x = (acc * m) & _MASK61
                x = x ^ (x >> 29)
                out.append(torch.remainder(x, self.cfg.table_rows))
        return torch.stack(out, dim=-1)

    @torch.no_grad()
    def gather(self, addr: torch.Tensor) -> torch.Tensor:
        """Rows for ``addr`` (B, T, H) from the host tables → (B, T, H, row_dim), no gradient."""
        return self.tables[self._flat(addr)]

    def _flat(self, addr: torch.Tensor) -> torch.Tensor:
        return torch.arange(self.n_heads).expand_as(addr) * self.cfg.table_rows + addr

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids → (B, T, H, row_dim) rows whose gradient reaches the tables as active rows."""
        flat = self._flat(self.addresses(ids)).to(self.tables.device)
        if not (torch.is_grad_enabled() and self.tables.requires_grad):
            return self.tables[flat]
        unique, local = active_rows(flat, self.tables.shape[0])
        return GatherRows.apply(self.tables, unique)[local]

    def embed(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The memory's contribution for tokens ``ids`` at hidden states ``hidden``."""
        return self(hidden, self.rows(ids))

    @property
    def tables(self) -> nn.Parameter:
        return self.table.weight

    def value_parameters(self) -> list[nn.Parameter]:
        return [self.tables]

    @property
    def value_lr(self) -> float:
        return self.cfg.lr

    sparse_values = True

    def refresh(self, addr: torch.Tensor, rows: torch.Tensor, since: int) -> torch.Tensor:
        """Patch rows gathered at update number ``since`` with updates made after it."""
        if since == self.update_count:
            return rows
        dirty = [flat for n, flat in list(self._updates) if n > since]
        if len(dirty) < self.update_count - since:  # the log no longer reaches back: gather again
            return self.gather(addr).to(rows.device)
        flat = self._flat(addr)
        stale = torch.isin(flat, torch.cat(dirty))
        rows = rows.clone()
        rows[stale.to(rows.device)] = self.tables.detach()[flat[stale]].to(rows.device, rows.dtype)
        return rows

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, d_model), rows (B, T, H, row_dim) from ``gather`` → (B, T, d_model)."""
        e = rows.flatten(-2).to(hidden.dtype)
        k = self.key(e)
        gate = torch.sigmoid((F.rms_norm(hidden, hidden.shape[-1:]) * F.rms_norm(k, k.shape[-1:])).sum(-1, True)
                             / hidden.shape[-1] ** 0.5)
        return gate * self.value(e)

    @torch.no_grad()
    def update_rows(self, addr: torch.Tensor, rows_grad: torch.Tensor, lr: float | None = None) -> None:
        """SGD on the gathered host rows only (duplicates accumulate)."""
        lr = self.cfg.lr if lr is None else lr
        flat = self._flat(addr).reshape(-1)
        self.tables.index_put_(
            (flat,), -lr * rows_grad.reshape(-1, self.cfg.row_dim).to(self.tables.device, self.tables.dtype),
            accumulate=True,
        )
        self._updates.append((self.update_count + 1, torch.unique(flat)))
        self.update_count += 1


class NgramPrefetcher:
    """Gathers each upcoming batch's rows on a background thread, ``depth`` batches ahead.

    Yields ``(ids, addr, rows)`` with ``rows`` on ``device`` and ready to take gradients; rows
    that ``update_rows`` changed after the gather are patched before the batch is yielded.
    """

    def __init__(self, memory: HashedNgramMemory, batches: Iterable[torch.Tensor], depth: int = 2,
                 device: str | torch.device = "cpu", timeout_s: float = 60.0):
        self.memory, self.device, self.timeout_s = memory, torch.device(device), timeout_s
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(iter(batches),), name="ngram-prefetch", daemon=True)
        self._thread.start()

    def _work(self, batches: Iterator[torch.Tensor]) -> None:
        try:
            for ids in batches:
                addr = self.memory.addresses(ids)
                since = self.memory.update_count  # read before gathering: later updates get patched
                rows = self.memory.gather(addr)
                if self.device.type == "cuda":
                    rows = rows.pin_memory().to(self.device, non_blocking=True)
                if not self._put((ids, addr, rows, since)):
                    return
            self._put(None)
        except BaseException as e:  # surfaced to the consumer, never swallowed
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        while True:
            try:
                item = self._queue.get(timeout=self.timeout_s)
            except queue.Empty:
                raise TimeoutError(f"n-gram prefetch thread gave no batch in {self.timeout_s}s") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise RuntimeError(f"n-gram prefetch thread failed: {item}") from item
            ids, addr, rows, since = item
            # Rows updated by steps that ran after the gather are patched, so training sees fresh rows.
            yield ids, addr, self.memory.refresh(addr, rows, since).requires_grad_(True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
