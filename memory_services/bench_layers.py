"""Memory-layer measurements of ``trainmem bench memory``: product-key forward (fp32, bf16) beside
lucidrains' ``product-key-memory`` at the same shape, and the value step at ~1M slots, sparse
(active rows + fused row Adam) against dense (full gradient + torch's fused Adam)."""

from __future__ import annotations

import copy
import time

import torch

from .config import ProductKeyConfig
from .layers import ProductKeyMemory, value_optimizer


def compare(fns: dict, seconds: float, min_iters: int = 3) -> dict:
    """Best seconds per call of each function, run in alternating rounds so load hits all alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    rounds, start = 0, time.perf_counter()
    while rounds < min_iters or time.perf_counter() - start < seconds * len(fns):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        rounds += 1
    return best


def bench_pkm(s: dict, budget: float) -> dict:
    from product_key_memory import PKM

    torch.manual_seed(0)
    ours = ProductKeyMemory(ProductKeyConfig(d_model=s["d"], heads=s["heads"], n_keys=s["n_keys"], k_dim=2 * s["half"],
                                             topk=s["topk"], gated=False, sparse=True))
    anchor = PKM(s["d"], heads=s["heads"], num_keys=s["n_keys"], topk=s["topk"], dim_head=s["half"])
    x = torch.randn(1, s["tokens"], s["d"])

    def forward(layer, inp):
        def run():
            with torch.no_grad():
                layer(inp)
        return run

    def forward_backward(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            layer(x).pow(2).mean().backward()
        return run

    fwd = compare({"ours": forward(ours, x), "pkm": forward(anchor, x)}, budget)
    fb = compare({"ours": forward_backward(ours), "pkm": forward_backward(anchor)}, budget)
    xb, ours_b, anchor_b = x.bfloat16(), copy.deepcopy(ours).bfloat16(), copy.deepcopy(anchor).bfloat16()
    try:
        forward(anchor_b, xb)()
        anchor_bf16 = "bf16"
    except RuntimeError:  # the package's bf16 path may not run: then it runs fp32, and the JSON says so
        anchor_b, anchor_bf16 = anchor, "fp32"
    fwd16 = compare({"ours": forward(ours_b, xb), "pkm": forward(anchor_b, xb if anchor_bf16 == "bf16" else x)}, budget)
    tok = s["tokens"]
    return {
        "shape": {k: s[k] for k in ("d", "heads", "n_keys", "topk", "half", "tokens")},
        "ours": {"fwd_tok_s": tok / fwd["ours"], "fwdbwd_tok_s": tok / fb["ours"], "fwd_bf16_tok_s": tok / fwd16["ours"]},
        "pkm": {"fwd_tok_s": tok / fwd["pkm"], "fwdbwd_tok_s": tok / fb["pkm"], "fwd_bf16_tok_s": tok / fwd16["pkm"]},
        "pkm_bf16_precision": anchor_bf16,
    }


def bench_sparse_dense(s: dict, budget: float) -> dict:
    x = torch.randn(s["tokens"], s["big_v"])
    times = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        layer = ProductKeyMemory(ProductKeyConfig(
            d_model=s["big_v"], heads=4, n_keys=s["big_keys"], k_dim=64, topk=32, gated=False, sparse=sparse))
        opt = value_optimizer(layer.value_parameters(), lr=1e-3, sparse=sparse)  # dense: torch Adam(fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            layer(x).pow(2).mean().backward()
            opt.step()

        times["sparse" if sparse else "dense"] = compare({"step": step}, budget)["step"]
    return {"slots": s["big_keys"] ** 2, "cols": s["big_v"], "sparse_step_s": times["sparse"],
            "dense_step_s": times["dense"]}
