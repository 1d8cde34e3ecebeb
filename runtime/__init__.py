"""trainmem.runtime: job spec, GPT, data, worker, controller, metrics.

Names are imported on first use: reading and checking a job spec does not import Ray, so the
``trainmem`` command can decide how Ray must bind (loopback for an embedded cluster) before Ray
reads its settings at import time.
"""

from trainmem.lazy import lazy_getattr


_WHERE = {
    "ClusterConfig": "config", "DataConfig": "config", "JobSpec": "config", "TrainConfig": "config",
    "load_spec": "config",
    "Controller": "controller", "JobFailed": "controller", "JobResult": "controller", "JobState": "controller",
    "InjectedFailure": "failure",
    "GPT": "models", "ModelConfig": "models", "build": "models", "lm_loss": "models", "split_into_stages": "models",
    "ConfigError": "spec_loader",
}

__all__ = list(_WHERE)

__getattr__ = lazy_getattr(__name__, _WHERE)
