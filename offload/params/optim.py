"""Host-side AdamW over one chunk shard at a time.

Kernels: ``torch`` runs torch's own single-tensor AdamW (what ``torch.optim.AdamW`` runs on CPU) on
each parameter's view of the shard, so results are bitwise torch's; ``torch_fused`` runs torch's
fused CPU AdamW once over the whole shard; ``deepspeed`` runs DeepSpeedCPUAdam's kernel (JIT-built
once into TORCH_EXTENSIONS_DIR, which defaults to the virtual environment) over the whole shard.
The flat kernels touch padding too: padding grads are zero and stay zero.
"""

from __future__ import annotations

import itertools
import os

import torch
from torch.optim.adam import adam

from trainmem.native import extensions_dir, import_deepspeed

BETAS = (0.9, 0.999)
EPS = 1e-8
_ids = itertools.count(1 << 20)


def load_deepspeed_adam():
    """DeepSpeedCPUAdam's compiled op, or raise ImportError/RuntimeError naming why it is unavailable."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    extensions_dir()
    import_deepspeed()
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return CPUAdamBuilder().load(verbose=False)


class HostAdamW:
    """AdamW with torch.optim.AdamW's defaults (betas 0.9/0.999, eps 1e-8), stepped shard by shard."""

    def __init__(self, kernel: str, *, lr: float, weight_decay: float):
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.requested = kernel
        self.fallback_reason: str | None = None  # why 'auto' did not get DeepSpeedCPUAdam
        self._ds = None
        if kernel in ("deepspeed", "auto"):
            try:
                self._ds = load_deepspeed_adam()
                self._ds_id = next(_ids)
                self._ds.create_adam(self._ds_id, self.lr, BETAS[0], BETAS[1], EPS, self.weight_decay, True, False)
                kernel = "deepspeed"
            except Exception as e:  # noqa: BLE001 -- any build/import failure falls back, named below
                if kernel == "deepspeed":
                    raise RuntimeError(f"placement.optimizer='deepspeed': DeepSpeedCPUAdam is unavailable ({e}) "
                                       "(fix: install deepspeed and a C++ compiler, or use 'torch_fused')") from e
                self.fallback_reason = str(e)
                kernel = "torch_fused"
        self.kernel = kernel

    def step_shard(self, step: int, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, views: list[tuple[int, int, tuple[int, ...]]]) -> None:
        """One AdamW step (``step`` counts from 1) on a flat shard; ``views`` = (offset, numel, shape) per param."""
        if self.kernel == "torch":
            for off, n, shape in views:
                sl = slice(off, off + n)
                self._torch(step, [param[sl].view(shape)], [grad[sl].view(shape)], [exp_avg[sl].view(shape)],
                            [exp_avg_sq[sl].view(shape)], fused=None)
        elif self.kernel == "torch_fused":
            self._torch(step, [param], [grad], [exp_avg], [exp_avg_sq], fused=True)
        else:
            self._ds.adam_update(self._ds_id, step, self.lr, BETAS[0], BETAS[1], EPS, self.weight_decay, True,
                                 param, grad, exp_avg, exp_avg_sq)

    def _torch(self, step: int, p, g, m, v, *, fused) -> None:
        steps = [torch.tensor(float(step - 1)) for _ in p]  # adam() increments each before use
        adam(p, g, m, v, [], steps, foreach=False, capturable=False, differentiable=False, fused=fused,
             grad_scale=None, found_inf=None, has_complex=False, decoupled_weight_decay=True, amsgrad=False,
             beta1=BETAS[0], beta2=BETAS[1], lr=self.lr, weight_decay=self.weight_decay, eps=EPS, maximize=False)
