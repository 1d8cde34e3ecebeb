"""Zero-bubble B/W split on the autograd graph: B computes only the stage-input gradient, W only
the weight gradients, and W does not redo B's work.

B runs ``autograd.grad(root, x, retain_graph=True)`` with pre-hooks on the *boundary* nodes: nodes
on a path from the root to x that also feed a path to a parameter not passing x. Every parent of a
boundary node lies on a path to x too, so B delivers each boundary node its complete incoming
gradient; the hooks keep it. W starts autograd at each boundary node with its kept gradient, asking
only for the parameters its x-free children reach, so it runs only the parameter side of the graph
(the weight matmuls, norm weights, ...). Where a parameter is also reachable through the x side of
a boundary node (that would count it twice), W falls back to one plain backward over the graph.
"""

from __future__ import annotations

import torch
from torch.autograd.graph import GradientEdge


def _acc_node(t: torch.Tensor):
    """The AccumulateGrad node of a leaf (or grad_fn of a non-leaf)."""
    if t.grad_fn is not None:
        return t.grad_fn
    return t.view_as(t).grad_fn.next_functions[0][0]


def _reach_sets(root, targets: set) -> dict:
    """For every node under ``root``: the frozenset of ``targets`` reachable from it."""
    memo: dict = {}
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = [c for c, _ in node.next_functions if c is not None]
        if not done:
            if node in memo:
                continue
            memo[node] = None  # visiting
            stack.append((node, True))
            stack.extend((c, False) for c in kids if c not in memo)
        else:
            hit = frozenset([node]) if node in targets else frozenset()
            memo[node] = hit.union(*(memo[c] for c in kids))
    return memo


class SplitBackward:
    """One (stage, microbatch)'s split backward. Call ``input_grad`` (B) then ``weight_grad`` (W).

    ``root`` is the stage output (or its ``GradientEdge``: the output's data is not needed)."""

    def __init__(self, root: torch.Tensor | GradientEdge, x: torch.Tensor, params: list[torch.Tensor]) -> None:
        self.root, self.x, self.params = root, x, params
        x_node = _acc_node(x)
        acc = {_acc_node(p): p for p in params}
        reach = _reach_sets(root.node if isinstance(root, GradientEdge) else root.grad_fn, set(acc) | {x_node})
        on_x = {n for n, hit in reach.items() if x_node in hit}
        self.plan: list[tuple[object, list[torch.Tensor]]] = []  # boundary node, params it feeds
        self.safe = True
        for n in on_x:
            direct, through = set(), set()
            for c, _ in n.next_functions:
                if c is not None:
                    (through if c in on_x else direct).update(reach[c] - {x_node})
            if direct:
                self.plan.append((n, [acc[a] for a in direct]))
                self.safe &= not (direct & through)
        self.boundary = [n for n, _ in self.plan]
        self.kept: dict = {}
        self._fallback_grad: torch.Tensor | None = None

    def input_grad(self, grad: torch.Tensor | None) -> torch.Tensor:
        handles = [n.register_prehook(self._keeper(n)) for n in self.boundary]
        try:
            (gx,) = torch.autograd.grad(self.root, [self.x], grad, retain_graph=True)
        finally:
            for h in handles:
                h.remove()
        if self._needs_fallback():
            self._fallback_grad = grad  # only the plain backward in W needs the output gradient again
        return gx

    def _needs_fallback(self) -> bool:
        return not self.safe or len(self.kept) != len(self.boundary)

    def _keeper(self, node):
        def hook(grad_outputs):
            self.kept[node] = grad_outputs

        return hook

    def weight_grad(self) -> None:
        """Accumulate the weight gradients into ``.grad`` and let the graph go."""
        if self._needs_fallback():
            torch.autograd.backward(self.root, self._fallback_grad, inputs=self.params)
        else:
            for node, params in self.plan:
                gouts = self.kept[node]
                idx = [i for i, g in enumerate(gouts) if g is not None]
                got = torch.autograd.grad([GradientEdge(node, i) for i in idx], params, [gouts[i] for i in idx],
                                          retain_graph=True, allow_unused=True)
                for p, g in zip(params, got):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
        self.kept.clear()
        self.root = self.x = self._fallback_grad = None
