"""Row-sparse Adam for memory value tables.

Same update as ``torch.optim.SparseAdam`` (lazy Adam: only rows present in the gradient move,
and only their moments decay), computed on gathered dense rows instead of through sparse-tensor
arithmetic, which on CPU costs seconds per step at a million slots.
"""

from __future__ import annotations

import math

import torch


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not lr > 0:
            raise ValueError(f"lr={lr} must be > 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas} must be in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @staticmethod
    def _rows(grad: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted unique row ids, summed row gradients) of a sparse (rows x cols) gradient.

        Row ids are bounded by the table, so a mark-and-compact pass over a bool vector finds
        the unique rows in linear time (torch.unique sorts, which costs more at 10^5 lookups).
        """
        idx, vals = grad._indices()[0], grad._values()
        if grad.is_coalesced():
            return idx, vals
        mark = torch.zeros(n_rows, dtype=torch.bool, device=idx.device)
        mark[idx] = True
        rows = mark.nonzero().squeeze(1)
        slot = torch.empty(n_rows, dtype=torch.long, device=idx.device)
        slot[rows] = torch.arange(len(rows), device=idx.device)
        summed = torch.zeros(len(rows), *vals.shape[1:], dtype=vals.dtype, device=vals.device)
        return rows, summed.index_add_(0, slot[idx], vals)

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
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                rows, g = self._rows(p.grad, p.shape[0])
                m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(g, alpha=1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)
        return loss
