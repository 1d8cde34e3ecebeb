"""[checkpoint.storage] and an s3:// checkpoint.dir are validated with the key and the fix named."""

from __future__ import annotations

import pytest

from trainmem.runtime import load_spec
from trainmem.runtime.spec_loader import ConfigError


@pytest.mark.parametrize("checkpoint,key,words", [
    ({"dir": "gs://bucket/p"}, "checkpoint.dir", "s3://bucket/prefix"),
    ({"dir": "s3:///nobucket"}, "checkpoint.dir", "s3://bucket/prefix"),
    ({"dir": "s3://b/p", "snapshot_every": 1, "flush_every": 2}, "checkpoint.flush_every", "flush_every = 0"),
    ({"storage": {"endpoint": "127.0.0.1:8333"}}, "checkpoint.storage.endpoint", "http://"),
    ({"storage": {"access_key_id": "AK"}}, "checkpoint.storage.access_key_id", "set both or neither"),
    ({"storage": {"request_timeout_s": 0}}, "checkpoint.storage.request_timeout_s", "> 0"),
])
def test_bad_storage_settings_name_the_key(tmp_path, checkpoint, key, words):
    with pytest.raises(ConfigError) as e:
        load_spec(None, {"train": {"run_dir": str(tmp_path)}, "checkpoint": checkpoint})
    assert key in str(e.value) and words in str(e.value)


def test_an_s3_dir_is_kept_as_a_uri_and_a_local_one_is_resolved(tmp_path, monkeypatch):
    spec = load_spec(None, {"train": {"run_dir": str(tmp_path)}, "checkpoint": {"dir": "s3://bkt/runs/a"}})
    assert spec.checkpoint_uri == "s3://bkt/runs/a" and spec.checkpoint_dir is None
    monkeypatch.chdir(tmp_path)
    spec = load_spec(None, {"train": {"run_dir": str(tmp_path)}, "checkpoint": {"dir": "ck"}})
    assert spec.checkpoint_uri == str(tmp_path / "ck") and spec.checkpoint_dir == tmp_path / "ck"


def test_credentials_come_from_the_aws_variables_when_not_in_the_file(monkeypatch):
    from trainmem.checkpoint import StorageConfig

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SKENV")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_REGION", raising=False)
    got = StorageConfig().resolved()
    assert (got.access_key_id, got.secret_access_key, got.region) == ("AKENV", "SKENV", "eu-west-3")
    assert StorageConfig(access_key_id="A", secret_access_key="S").resolved().access_key_id == "A"
