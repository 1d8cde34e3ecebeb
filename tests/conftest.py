import os

# Embedded and test clusters stay on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# A raylet starts two idle Python workers when the first driver connects. The suite starts ~28 clusters
# whose actors mostly get workers of their own, so those idle ones only cost start-up (~80 CPU-s in all,
# measured per process over a whole run). Raylets read RAY_<setting> from the environment they inherit.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 endpoint (SeaweedFS on 127.0.0.1, ~10 s to start), one per test module that asks."""
    from trainmem.checkpoint.seaweed import LocalS3

    server = LocalS3().start()
    yield server
    server.stop()


# CPU-seconds per module, one process on the 2-core dev machine (2026-12-07): the heaviest start first so
# that two processes end together (longest first). Only the order depends on these; refresh them when a
# module's cost changes a lot, a module not listed sorts after the listed ones of its kind.
_MODULE_CPU_S = {
    "checkpoint/test_e2e.py": 166, "runtime/test_recovery.py": 165, "memory_services/test_serve.py": 139,
    "launch/test_chaos.py": 133, "runtime/test_engines.py": 120, "runtime/test_deepspeed_job.py": 110,
    "memory_services/test_layer_service.py": 86, "runtime/test_bench_launch.py": 76,
    "checkpoint/test_local_ray.py": 69, "memory_services/test_config_cli.py": 62,
    "runtime/test_placement_job.py": 60, "runtime/test_no_shared_fs.py": 52, "launch/test_mpirun.py": 48,
    "runtime/test_restore_walk.py": 45, "runtime/test_job.py": 40, "offload/test_offload_long_context.py": 29,
    "runtime/test_bench_torchft.py": 29, "offload/test_placement_bench.py": 28, "memory_services/test_retriever.py": 24,
    "parallel/test_bench.py": 23, "runtime/test_gpu_check.py": 20, "launch/test_existing_cluster.py": 18,
    "launch/test_loopback.py": 16, "parallel/test_executor.py": 14, "memory_services/test_consolidation.py": 12,
}


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, the costliest first: under ``-n`` the long modules start at once and
    the quick ones fill the tail, instead of one long module running alone at the end. The sort is stable
    and by module, so each module's tests stay together (a module-scoped Ray cluster starts once)."""
    tests = config.rootpath / "tests"
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def cost(item) -> int:
        rel = item.path.relative_to(tests).as_posix() if item.path.is_relative_to(tests) else ""
        return _MODULE_CPU_S.get(rel, 0)

    items.sort(key=lambda item: (item.path not in slow, -cost(item)))
