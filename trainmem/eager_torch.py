"""Keep eager training processes from importing torch._dynamo (about 1 CPU-s each) for nothing.

torch's optimizers import torch._dynamo on their first use: ``step`` calls
``torch._dynamo.graph_break()`` (a no-op outside torch.compile), and ``add_param_group`` (every
constructor), ``zero_grad``, ``state_dict`` and ``load_state_dict`` are wrapped in
``torch._disable_dynamo``, which imports it to build a wrapper that keeps torch.compile from
tracing them. A rank that never compiles pays that import before its first step: in a new trainer
it is the largest start-up cost after ``import torch`` itself, in a warm spare it delays recovery,
and a test suite starts ~190 trainers.

:func:`defer_dynamo_import` patches those functions to run directly while torch._dynamo is not
imported (nothing can be tracing them: torch.compile imports torch._dynamo before it traces) and
to take torch's own path once it is, so compiled code keeps torch's behaviour. Each patch checks
that torch's wrapper is the one it knows (its code object and the names it uses); a torch that
changes them is left unpatched, on torch's path.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any, Callable

# Every name torch's step wrapper (``_use_grad``) uses; one more means it does more than ours repeats: leave it.
_USE_GRAD_NAMES = frozenset({"torch", "torch._dynamo", "_dynamo", "cast", "Optimizer", "is_grad_enabled",
                             "set_grad_enabled", "defaults", "graph_break"})
_CACHE_ATTR = "__dynamo_disable"  # where torch's wrapper caches its torch._dynamo.disable(fn)


class _EagerUntilDynamo:
    """Stands in for torch's cached disable wrapper of ``fn`` until torch._dynamo is imported."""

    def __init__(self, fn: Callable[..., Any], recursive: bool):
        self.fn, self.recursive = fn, recursive

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        dynamo = sys.modules.get("torch._dynamo")
        disable = getattr(dynamo, "disable", None)  # None also while torch._dynamo is half-imported
        if disable is None:
            return self.fn(*args, **kwargs)
        wrapped = disable(self.fn, self.recursive, wrapping=False)  # what torch's own first call builds
        setattr(self.fn, _CACHE_ATTR, wrapped)  # setattr: a dunder name in a class body would be mangled
        return wrapped(*args, **kwargs)


def _wrapped_target(candidate: Any, code: types.CodeType | None) -> tuple[Callable[..., Any], bool] | None:
    """(fn, recursive) if ``candidate`` is torch's disable wrapper around ``fn``, else None."""
    if not isinstance(candidate, types.FunctionType) or candidate.__code__ is not code or not candidate.__closure__:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in candidate.__closure__)))
    fn, recursive = cells.get("fn"), cells.get("recursive", True)
    return (fn, bool(recursive)) if callable(fn) else None


def _eager_step(torch_step: Callable[..., Any], func: Callable[..., Any]) -> Callable[..., Any]:
    """An optimizer's ``step``: torch's wrapper without its two ``graph_break`` calls (no-ops in eager)."""
    import torch

    @functools.wraps(func)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if "torch._dynamo" in sys.modules:  # torch.compile may be tracing this: torch's wrapper, graph breaks
            return torch_step(self, *args, **kwargs)
        grad_was_enabled = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return func(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(grad_was_enabled)

    step.eager_until_dynamo = True
    return step


def _patch_optimizer_steps() -> int:
    """Give each torch optimizer class whose ``step`` is torch's ``_use_grad`` wrapper :func:`_eager_step`.

    Only before the class's first instance: the constructor wraps ``step`` in its profiling hook,
    which then wraps ours; a class already hooked keeps torch's path.
    """
    import torch
    from torch.optim.optimizer import Optimizer, _use_grad_for_differentiable

    use_grad_code = _use_grad_for_differentiable(lambda self: None).__code__
    if not set(use_grad_code.co_names) <= _USE_GRAD_NAMES or use_grad_code.co_freevars != ("func",):
        return 0
    patched = 0
    for cls in vars(torch.optim).values():
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            continue
        torch_step = vars(cls).get("step")
        if getattr(torch_step, "eager_until_dynamo", False):
            patched += 1
        elif isinstance(torch_step, types.FunctionType) and torch_step.__code__ is use_grad_code:
            cls.step = _eager_step(torch_step, torch_step.__closure__[0].cell_contents)
            patched += 1
    return patched


def _patch_disable_wrappers() -> int:
    """Give each ``torch._disable_dynamo`` wrapper on ``Optimizer`` an :class:`_EagerUntilDynamo` to call."""
    import torch
    from torch.optim.optimizer import Optimizer

    code = getattr(torch._disable_dynamo(lambda: None), "__code__", None)
    patched = 0
    for candidate in vars(Optimizer).values():
        target = _wrapped_target(candidate, code)
        if target is None:
            continue
        fn, recursive = target
        if getattr(fn, _CACHE_ATTR, None) is None:
            setattr(fn, _CACHE_ATTR, _EagerUntilDynamo(fn, recursive))
        patched += 1
    return patched


def defer_dynamo_import() -> int:
    """Patch torch's optimizers so that eager training imports no torch._dynamo; returns how many
    functions are patched (idempotent). Call it before the process builds its first optimizer."""
    return _patch_disable_wrappers() + _patch_optimizer_steps()
