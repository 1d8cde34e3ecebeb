"""Row-sparse Adam for memory value tables: torch's fused Adam on the rows a step read.

Lazy Adam, as ``torch.optim.SparseAdam`` is lazy: only rows present in the gradient move, and
only their moments decay; the step count (and so bias correction) is the table's. The update of
a present row is exactly ``torch.optim.Adam``'s. Per step: the (param, exp_avg, exp_avg_sq) rows
are gathered into buffers kept between steps, ``torch._fused_adam_`` updates them in one pass,
and they are scattered back. A gradient built by ``GatherRows`` is already coalesced; others
(summed over data-parallel ranks or accumulated microbatches) are merged in linear time first.
"""

from __future__ import annotations

import torch


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr={lr} must be > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self._scratch: dict[int, list[torch.Tensor]] = {}

    @staticmethod
    def rows_of(grad: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted unique row ids, summed row gradients) of a sparse (rows x cols) gradient."""
        idx, vals = grad._indices()[0], grad._values()
        # autograd's gradient accumulation drops the coalesced flag GatherRows set; strictly
        # increasing rows say the same thing for the price of one comparison pass.
        if grad.is_coalesced() or bool((idx[1:] > idx[:-1]).all()):
            return idx, vals
        mark = torch.zeros(n_rows, dtype=torch.bool, device=idx.device)
        mark[idx] = True
        rows = mark.nonzero().squeeze(1)
        slot = torch.empty(n_rows, dtype=torch.long, device=idx.device)
        slot[rows] = torch.arange(len(rows), device=idx.device)
        summed = torch.zeros(len(rows), *vals.shape[1:], dtype=vals.dtype, device=vals.device)
        return rows, summed.index_add_(0, slot[idx], vals)

    def _buffers(self, p: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Three (n, cols) row buffers for ``p``, grown by doubling and reused across steps."""
        bufs = self._scratch.get(id(p))
        if bufs is None or bufs[0].shape[0] < n:
            cap = max(n, 2 * bufs[0].shape[0]) if bufs else n
            bufs = [torch.empty(cap, *p.shape[1:], dtype=p.dtype, device=p.device) for _ in range(3)]
            self._scratch[id(p)] = bufs
        return [b[:n] for b in bufs]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError("RowSparseAdam takes sparse gradients (build the layer with sparse=True)")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                elif not torch.is_tensor(state["step"]):  # a checkpoint from before steps were tensors
                    state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
                rows, grad = self.rows_of(p.grad, p.shape[0])
                if len(rows) == 0:
                    continue
                pr, mr, vr = self._buffers(p, len(rows))
                torch.index_select(p, 0, rows, out=pr)
                torch.index_select(state["exp_avg"], 0, rows, out=mr)
                torch.index_select(state["exp_avg_sq"], 0, rows, out=vr)
                state["step"] += 1
                torch._fused_adam_(
                    [pr], [grad.to(p.dtype).contiguous()], [mr], [vr], [], [state["step"]], lr=group["lr"],
                    beta1=beta1, beta2=beta2, weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False,
                )
                p.index_copy_(0, rows, pr)
                state["exp_avg"].index_copy_(0, rows, mr)
                state["exp_avg_sq"].index_copy_(0, rows, vr)
        return loss
