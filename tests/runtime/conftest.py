import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded Ray cluster per test module (start-up costs seconds)."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", namespace="trainmem-tests")
    yield
    ray.shutdown()


def tiny_overrides(run_dir, **sections):
    """Overrides for a seconds-long 2-worker job on the tiny GPT; ``sections`` merge per table."""
    base = {
        "model": {"size": "tiny"},
        "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "seed": 7, "run_dir": str(run_dir)},
        "cluster": {"workers": 2, "hang_timeout_s": 10.0},
        "checkpoint": {"every_steps": 5},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return base
