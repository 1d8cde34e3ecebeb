import os

import pytest
import ray


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded Ray cluster per test module (start-up costs seconds)."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", namespace="trainmem-tests")
    yield
    ray.shutdown()
