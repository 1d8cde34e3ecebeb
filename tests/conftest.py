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
    """Slow tests first (a stable sort): under ``-n`` the long modules start at once and the quick
    ones fill the tail, instead of one long module running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
