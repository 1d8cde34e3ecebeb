"""trainmem.runtime: job spec, GPT, data, worker, controller, metrics."""

from .config import ClusterConfig, DataConfig, JobSpec, TrainConfig, load_spec
from .controller import Controller, JobFailed, JobResult, JobState
from .failure import InjectedFailure
from .models import GPT, ModelConfig, build, lm_loss, split_into_stages
from .spec_loader import ConfigError

__all__ = [
    "ClusterConfig", "ConfigError", "Controller", "DataConfig", "GPT", "InjectedFailure", "JobFailed",
    "JobResult", "JobSpec", "JobState", "ModelConfig", "TrainConfig", "build", "lm_loss", "load_spec",
    "split_into_stages",
]
