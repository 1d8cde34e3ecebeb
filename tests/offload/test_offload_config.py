"""[memory] checks: each bad value is one ValueError starting with "<field>=<value>"."""

from __future__ import annotations

import pytest

from trainmem.offload import ActivationConfig
from trainmem.runtime.spec_loader import ConfigError, build_dataclass, field_docs


@pytest.mark.parametrize("kwargs, field", [
    ({"activations": "sometimes"}, "activations"),
    ({"activations": "auto", "activation_budget": 0.0}, "activation_budget"),
    ({"activations": "auto", "activation_budget": 1.5}, "activation_budget"),
    ({"activations": "auto", "activation_budget": -3}, "activation_budget"),
    ({"activations": "auto"}, "activations"),
    ({"activation_budget": 0.5}, "activation_budget"),
    ({"activations": "offload", "alpha": 1.2}, "alpha"),
    ({"activations": "recompute", "alpha": 0.5}, "alpha"),
    ({"host_pool_bytes": -1}, "host_pool_bytes"),
    ({"host_pool_max_fraction": 0.0}, "host_pool_max_fraction"),
    ({"offload_min_bytes": -1}, "offload_min_bytes"),
    ({"prefetch_blocks": -1}, "prefetch_blocks"),
    ({"alpha_steps": 0}, "alpha_steps"),
])
def test_bad_values(kwargs, field):
    with pytest.raises(ValueError) as err:
        ActivationConfig(**kwargs)
    assert str(err.value).startswith(f"{field}=")


def test_budget_bytes_and_fraction():
    assert ActivationConfig(activations="auto", activation_budget=0.25).budget_bytes(1000) == 250
    assert ActivationConfig(activations="auto", activation_budget=300).budget_bytes(1000) == 300
    assert ActivationConfig(activations="offload").budget_bytes(1000) is None


def test_every_field_documented_and_toml_errors_name_the_key():
    docs = field_docs(ActivationConfig)
    assert set(docs) == set(ActivationConfig.__dataclass_fields__)
    cfg = build_dataclass(ActivationConfig, {"activations": "auto", "activation_budget": 0.5}, "job.toml", "memory")
    assert cfg.activation_budget == 0.5
    with pytest.raises(ConfigError, match=r"job.toml: memory.alpha: alpha=2.0 must be in \[0, 1\]"):
        build_dataclass(ActivationConfig, {"activations": "offload", "alpha": 2.0}, "job.toml", "memory")
