"""trainmem.runtime: job spec, GPT, data, worker, controller, metrics.

Names are imported on first use: reading and checking a job spec does not import Ray, so the
``trainmem`` command can decide how Ray must bind (loopback for an embedded cluster) before Ray
reads its settings at import time.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "ClusterConfig": "config", "DataConfig": "config", "JobSpec": "config", "TrainConfig": "config",
    "load_spec": "config",
    "Controller": "controller", "JobFailed": "controller", "JobResult": "controller", "JobState": "controller",
    "InjectedFailure": "failure",
    "GPT": "models", "ModelConfig": "models", "build": "models", "lm_loss": "models", "split_into_stages": "models",
    "ConfigError": "spec_loader",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'trainmem.runtime' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
