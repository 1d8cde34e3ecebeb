"""Hashed n-gram memory: deterministic addresses, prefetch equal to direct gathers, sparse host updates."""

from __future__ import annotations

import pytest
import torch

from trainmem.memory_services import EngramConfig, HashedNgramMemory, NgramPrefetcher

CFG = EngramConfig(d_model=32, orders=[2, 3], heads_per_order=2, table_rows=1009, row_dim=8)


def test_addresses_depend_only_on_the_last_n_ids():
    mem, twin = HashedNgramMemory(CFG, seed=3), HashedNgramMemory(CFG, seed=3)
    ids = torch.randint(0, 256, (4, 40), generator=torch.Generator().manual_seed(0))
    addr = mem.addresses(ids)
    assert addr.shape == (4, 40, 4) and addr.min() >= 0 and addr.max() < CFG.table_rows
    assert torch.equal(addr, twin.addresses(ids))  # same seed: same addresses, in any process
    other = ids.clone()
    other[:, :30] = (other[:, :30] + 1) % 256  # change everything except the last 10 ids
    same = mem.addresses(other)
    assert torch.equal(same[:, 32:, :2], addr[:, 32:, :2])  # order-2 heads see only ids t-1, t
    assert torch.equal(same[:, 33:, 2:], addr[:, 33:, 2:])  # order-3 heads see t-2..t
    assert not torch.equal(same[:, :30], addr[:, :30])
    spread = torch.bincount(addr[..., 0].flatten(), minlength=CFG.table_rows)
    assert spread.max() <= 4  # 160 n-grams over 1009 rows: no pile-up on a few rows


def test_prefetched_rows_equal_direct_gather_and_training_touches_only_them():
    mem = HashedNgramMemory(CFG)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 16), generator=gen) for _ in range(5)]
    hidden = torch.randn(2, 16, 32, generator=gen)
    prefetch = NgramPrefetcher(mem, batches, depth=2)
    seen = 0
    for ids, addr, rows in prefetch:
        assert torch.equal(addr, mem.addresses(ids))
        assert torch.equal(rows, mem.gather(addr))
        before = mem.tables.detach().clone()
        mem(hidden, rows).pow(2).mean().backward()
        mem.update_rows(addr, rows.grad, lr=0.5)
        changed = (mem.tables != before).any(-1)  # one flag per row of every head's table
        touched = torch.zeros_like(changed)
        touched[torch.arange(mem.n_heads).expand_as(addr).reshape(-1) * CFG.table_rows + addr.reshape(-1)] = True
        assert changed.any() and not (changed & ~touched).any()
        seen += 1
    assert seen == 5
    prefetch.close()


def test_prefetch_errors_surface_in_the_consumer():
    def broken():
        yield torch.zeros(1, 4, dtype=torch.long)
        raise OSError("disk gone")

    with pytest.raises(RuntimeError, match="prefetch thread failed: disk gone"):
        for _ in NgramPrefetcher(HashedNgramMemory(CFG), broken()):
            pass


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match=r"^orders=\[\]"):
        EngramConfig(orders=[])
    with pytest.raises(ValueError, match=r"^table_rows=0"):
        EngramConfig(table_rows=0)


def test_ngram_memory_in_a_model_is_in_state_dict_and_trains_only_the_rows_read():
    from trainmem.memory_services import build_optimizers
    from trainmem.runtime.models import ModelConfig, build, lm_loss

    cfg = ModelConfig(size="tiny", ngram_memory=True, engram=EngramConfig(d_model=0, table_rows=1009, row_dim=8))
    model = build(cfg, seed=0)
    state = model.state_dict()
    assert state["embed.ngram.table.weight"].shape == (len(cfg.engram.orders) * cfg.engram.heads_per_order * 1009, 8)
    twin = build(cfg, seed=0)
    twin.load_state_dict(state)  # checkpoints keep the tables: a reload is bitwise the same
    assert torch.equal(twin.embed.ngram.tables, model.embed.ngram.tables)
    opts = build_optimizers(model, lr=3e-3)
    assert any(p is model.embed.ngram.tables for o in opts[1:] for g in o.param_groups for p in g["params"])
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    read = model.embed.ngram._flat(model.embed.ngram.addresses(idx[:, :-1])).unique()
    before = model.embed.ngram.tables.detach().clone()
    losses = []
    for _ in range(6):
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        assert model.embed.ngram.tables.grad.is_sparse
        for o in opts:
            o.step()
        losses.append(loss.item())
    changed = (model.embed.ngram.tables != before).any(-1).nonzero().flatten()
    assert set(changed.tolist()) == set(read.tolist())
    assert losses[-1] < losses[0]
