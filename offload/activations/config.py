"""``[memory]``: how a job keeps, offloads or recomputes its transformer blocks' activations."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("none", "recompute", "offload", "auto")


@dataclass(kw_only=True)
class ActivationConfig:
    activations: str = "none"
    """Policy for the saved activations of each transformer block: none (keep all, only meter them) |
    recompute (drop and recompute whole blocks) | offload (copy to a host buffer pool; a fraction alpha of
    each block's tokens offloaded, the rest recomputed) | auto (the planner mixes keep, offload and recompute
    per block to meet activation_budget at the least predicted step time)."""
    activation_budget: int | float | None = None
    """Peak device-resident saved-activation bytes allowed: an integer is bytes, a float in (0, 1] is a
    fraction of the no-policy peak measured in the warm-up step. None: recompute/offload apply to every
    block; auto needs a budget."""
    alpha: float | None = None
    """Fraction of each offloaded block's tokens whose activations are offloaded (the rest are recomputed
    from the offloaded block input and attention output). None: the planner picks per block (MEMO's rule
    without a budget: the largest alpha whose copy hides under the block's forward and fits the pool)."""
    host_pool_bytes: int = 0
    """Size of the host buffer pool (pinned on CUDA), allocated once. 0: sized to the plan's need, at most
    host_pool_max_fraction of this machine's RAM. Offload never grows it: a full pool is an error."""
    host_pool_max_fraction: float = 0.25
    """With host_pool_bytes = 0: the largest share of physical RAM the pool may take."""
    offload_min_bytes: int = 0
    """Saved tensors smaller than this stay on the device instead of being copied (tiny copies cost more
    than they save on a GPU)."""
    prefetch_blocks: int = 1
    """CUDA only: how many blocks ahead backward fetches offloaded tensors back to the device."""
    alpha_steps: int = 8
    """The planner tries alpha in multiples of 1/alpha_steps."""

    def __post_init__(self) -> None:
        if self.activations not in MODES:
            raise ValueError(f"activations={self.activations!r} must be one of {', '.join(MODES)}")
        budget = self.activation_budget
        if isinstance(budget, bool):
            raise ValueError(f"activation_budget={budget!r} must be bytes (int) or a fraction (float)")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(
                f"activation_budget={budget} as a float is a fraction of the no-policy peak and must be in (0, 1]"
                " (write an integer for bytes)"
            )
        if isinstance(budget, int) and budget <= 0:
            raise ValueError(f"activation_budget={budget} bytes must be > 0")
        if self.activations == "auto" and budget is None:
            raise ValueError("activations='auto' needs activation_budget (bytes or a fraction of the no-policy peak)")
        if self.activations == "none" and budget is not None:
            raise ValueError(
                f"activation_budget={budget} is set but activations='none' ignores it (pick recompute, offload or auto)"
            )
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} must be in [0, 1]")
        if self.alpha is not None and self.activations not in ("offload", "auto"):
            raise ValueError(f"alpha={self.alpha} only applies to activations='offload' or 'auto'")
        if self.host_pool_bytes < 0:
            raise ValueError(f"host_pool_bytes={self.host_pool_bytes} must be >= 0 (0: sized by the plan)")
        if not 0.0 < self.host_pool_max_fraction <= 0.9:
            raise ValueError(f"host_pool_max_fraction={self.host_pool_max_fraction} must be in (0, 0.9]")
        if self.offload_min_bytes < 0:
            raise ValueError(f"offload_min_bytes={self.offload_min_bytes} must be >= 0")
        if self.prefetch_blocks < 0:
            raise ValueError(f"prefetch_blocks={self.prefetch_blocks} must be >= 0")
        if not 1 <= self.alpha_steps <= 64:
            raise ValueError(f"alpha_steps={self.alpha_steps} must be in 1..64")

    def budget_bytes(self, no_policy_peak: int) -> int | None:
        """The budget in bytes, given the measured no-policy peak."""
        if self.activation_budget is None:
            return None
        if isinstance(self.activation_budget, float):
            return int(self.activation_budget * no_policy_peak)
        return int(self.activation_budget)
