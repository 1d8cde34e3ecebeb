import os

# Embedded and test clusters stay on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def s3_server():
    """A real S3 endpoint (SeaweedFS on 127.0.0.1, ~10 s to start), one per test module that asks."""
    from trainmem.checkpoint.seaweed import LocalS3

    server = LocalS3().start()
    yield server
    server.stop()


def pytest_collection_modifyitems(items):
    """Modules with slow tests first: under ``-n`` the long modules start at once and the quick ones
    fill the tail, instead of one long module running alone at the end. The sort is stable and by
    module, so each module's tests stay together (a module-scoped Ray cluster starts once)."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
