"""The real `trainmem serve`, started by the test, through a real HTTP client: CRUD across a restart
(the index is reloaded, not rebuilt), 2,000 concurrent writes with a SIGKILL mid-way, 30 bad
requests, and three consolidations at once (cron + HTTP + CLI) of which exactly one runs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from trainmem.memory_services import MemoryClient, MemoryServiceError, MemoryStore

from memsvc_data import clustered, representation
from serve_proc import REPO, ServeProcess, serve_processes_env

pytestmark = pytest.mark.slow

DIM = 16


def _toml(tmp: Path, schedule: str = "0 0 1 1 *", distill_steps: int = 20, extra: str = "") -> Path:
    path = tmp / "memory.toml"
    path.write_text(f"""
[services]
store_path = "{tmp / 'store'}"
embedding_dim = {DIM}
num_cpus = 2
[services.retriever]
embedder = "none"
save_every_s = 3600
[services.consolidation]
schedule = "{schedule}"
distill = true
distill_steps = {distill_steps}
lease_ttl_s = 30
[services.http]
port = 0
max_batch = 64
max_text_chars = 200
max_body_bytes = 200000
[services.memory_layer]
d_model = {DIM}
n_keys = 16
topk = 4
{extra}
""")
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def running(home):
    """The service the CRUD test restarted, kept up for the next tests (each start costs Ray's start-up)."""
    held: dict[str, ServeProcess] = {}
    yield held
    if "svc" in held:
        held["svc"].kill()


def _service(running, toml: Path) -> ServeProcess:
    if "svc" not in running or running["svc"].proc.poll() is not None:
        running["svc"] = ServeProcess(toml)
    return running["svc"]


def _vec(seed: int, n: int = 1) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_crud_round_trip_survives_a_restart_and_the_index_is_reloaded(home, running):
    toml = _toml(home)
    svc = ServeProcess(toml)
    try:
        assert "generated a token" in svc.token_line and (svc.token_path.stat().st_mode & 0o777) == 0o600
        c = MemoryClient(svc.url, svc.token())
        added = c.add(["alpha", "beta", "gamma"], _vec(1, 3), [{"kind": "a", "n": 1}, {"kind": "b", "n": 2}, {}],
                      ids=["m-alpha", "m-beta", "m-gamma"], namespace="team")
        assert [e["version"] for e in added] == [0, 0, 0]
        assert c.get("m-alpha")["text"] == "alpha"
        updated = c.update("m-alpha", version=0, text="alpha v2", metadata={"kind": "a", "n": 10})
        assert updated["version"] == 1
        with pytest.raises(MemoryServiceError) as e:
            c.update("m-alpha", version=0, text="stale writer")  # compare-and-swap
        assert e.value.status == 409 and e.value.body["version"] == 1
        assert c.upsert("m-delta", "delta", _vec(4)[0], namespace="team")["version"] == 0
        c.delete("m-gamma")
        with pytest.raises(MemoryServiceError) as e:
            c.get("m-gamma")
        assert e.value.status == 404
        assert c.add(["gamma again"], _vec(3), ids=["m-gamma"], namespace="team")[0]["version"] == 2  # re-added
        entries, cursor = c.list(namespace="team", where={"n": {"$gte": 2, "$lt": 5}}, limit=10)
        assert [x["id"] for x in entries] == ["m-beta"] and cursor is None
        assert {x["id"] for x in c.iterate(namespace="team")} == {"m-alpha", "m-beta", "m-gamma", "m-delta"}
        hits = c.search(_vec(1, 3)[:1], k=2, namespace="team")[0]
        assert hits[0]["id"] == "m-alpha" and hits[0]["text"] == "alpha v2" and hits[0]["metadata"]["n"] == 10
        before = {"search": c.search(_vec(1, 3), k=3), "list": c.list(namespace="team", limit=10)[0]}
        assert c.stats()["store"]["index"]["rebuilt"] is True  # first start: nothing saved yet
        docs = httpx.get(svc.url + "/openapi.json", timeout=30).json()
        assert {"/v1/entries", "/v1/search", "/v1/lookup", "/v1/consolidate"} <= set(docs["paths"])
        c.close()
    finally:
        assert svc.stop() == 0  # clean stop: replicas save their index
    assert (home / "store" / "index" / "manifest.json").exists()

    again = running["svc"] = ServeProcess(toml)  # left running for the next tests
    assert "token in" in again.token_line  # the same token file is reused
    c = MemoryClient(again.url, again.token())
    assert {"search": c.search(_vec(1, 3), k=3), "list": c.list(namespace="team", limit=10)[0]} == before
    assert c.get("m-alpha")["version"] == 1
    index = c.stats()["store"]["index"]
    assert index["loaded"] is True and index["rebuilt"] is False and index.get("replayed", 0) == 0
    c.close()


def test_the_embedded_cluster_gives_every_serve_process_passive_openmp_waits(home, running):
    svc = _service(running, _toml(home))
    env = serve_processes_env(svc.proc.pid, "OMP_WAIT_POLICY")
    replicas = {"MemoryApi", "MemoryRouter", "ValueShard0", "Consolidation"}
    # A replica in a call is titled ``ray::ServeReplica:app:Deployment.method``.
    deployments = {title.rsplit(":", 1)[-1].split(".")[0] for title, _ in env if title.startswith("ray::ServeReplica")}
    assert deployments == replicas
    # Serve's controller and proxy get no runtime_env from us: PASSIVE there means inherited from the cluster,
    # the path on which replicas need no runtime_env (a set-up process and a worker of their own each).
    assert {value for _, value in env} == {"PASSIVE"}, env


def test_bad_requests_get_4xx_json_and_change_nothing(home, running):
    svc = _service(running, _toml(home))
    token = svc.token()
    ok = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    e = [1.0] * DIM
    bad = [
        # (name, method, path, headers, body, status, needle)
        ("no token", "POST", "/v1/entries", {"Content-Type": "application/json"}, {"entries": [{"text": "x", "embedding": e}]}, 401, "bearer"),
        ("wrong token", "POST", "/v1/entries", {"Authorization": "Bearer nope"}, {"entries": [{"text": "x", "embedding": e}]}, 401, "bearer"),
        ("basic auth", "GET", "/v1/stats", {"Authorization": f"Basic {token}"}, None, 401, "bearer"),
        ("token, broken body", "POST", "/v1/entries", {"Authorization": "Bearer nope"}, b"{broken", 401, "bearer"),
        ("oversized body", "POST", "/v1/entries", ok, b"[" + b"1," * 150_000 + b"1]", 413, "max_body_bytes"),
        ("malformed JSON", "POST", "/v1/entries", ok, b'{"entries": [', 400, "malformed JSON"),
        ("wrong dims", "POST", "/v1/entries", ok, {"entries": [{"text": "x", "embedding": [1.0, 2.0]}]}, 422, "expected 16"),
        ("NaN vector", "POST", "/v1/entries", ok, b'{"entries": [{"text": "x", "embedding": [NaN' + b", 1.0" * (DIM - 1) + b"]}]}", 422, "NaN"),
        ("infinite query", "POST", "/v1/search", ok, b'{"queries": [[Infinity' + b", 1.0" * (DIM - 1) + b"]]}", 422, "NaN or infinity"),
        ("text is a number", "POST", "/v1/entries", ok, {"entries": [{"text": 5, "embedding": e}]}, 422, "text"),
        ("text too long", "POST", "/v1/entries", ok, {"entries": [{"text": "x" * 201, "embedding": e}]}, 422, "max 200"),
        ("too many entries", "POST", "/v1/entries", ok, {"entries": [{"text": "x", "embedding": e}] * 65}, 413, "max_batch=64"),
        ("empty entries", "POST", "/v1/entries", ok, {"entries": []}, 422, "entries"),
        ("unknown field", "POST", "/v1/entries", ok, {"entries": [{"text": "x", "embedding": e, "oops": 1}]}, 422, "oops"),
        ("reserved metadata", "POST", "/v1/entries", ok, {"entries": [{"text": "x", "embedding": e, "metadata": {"consolidated_from": "y"}}]}, 422, "reserved"),
        ("reserved prefix", "POST", "/v1/entries", ok, {"entries": [{"text": "x", "embedding": e, "metadata": {"trainmem.v": 1}}]}, 422, "reserved"),
        ("nested metadata", "POST", "/v1/entries", ok, {"entries": [{"text": "x", "embedding": e, "metadata": {"a": {"b": 1}}}]}, 422, "metadata"),
        ("bad id", "POST", "/v1/entries", ok, {"entries": [{"id": "../etc", "text": "x", "embedding": e}]}, 422, "id"),
        ("zero embedding", "POST", "/v1/entries", ok, {"entries": [{"text": "x", "embedding": [0.0] * DIM}]}, 422, "zeros"),
        ("text without embedder", "POST", "/v1/entries", ok, {"entries": [{"text": "x"}]}, 422, "embedding is required"),
        ("k too large", "POST", "/v1/search", ok, {"queries": [e], "k": 101}, 422, "max_k=100"),
        ("k zero", "POST", "/v1/search", ok, {"queries": [e], "k": 0}, 422, "k"),
        ("queries and texts", "POST", "/v1/search", ok, {"queries": [e], "texts": ["a"]}, 422, "exactly one"),
        ("bad filter operator", "POST", "/v1/search", ok, {"queries": [e], "where": {"a": {"$regex": "x"}}}, 422, "unknown operator"),
        ("bad base64", "POST", "/v1/search", ok, {"queries_b64": "%%%"}, 422, "base64"),
        ("ragged base64", "POST", "/v1/search", ok, {"queries_b64": "AAAA"}, 422, "float32"),
        ("lookup dims", "POST", "/v1/lookup", ok, {"vectors": [[1.0] * 3]}, 422, "expected 16"),
        ("update without version", "PATCH", "/v1/entries/some-id", ok, {"text": "y"}, 422, "version"),
        ("update unknown id", "PATCH", "/v1/entries/no-such-id", ok, {"version": 0, "text": "y"}, 404, "no entry"),
        ("delete unknown id", "DELETE", "/v1/entries/no-such-id", ok, None, 404, "no entry"),
        ("page too large", "POST", "/v1/entries/list", ok, {"limit": 5000}, 422, "max_page=1000"),
        ("bad cursor", "POST", "/v1/entries/list", ok, {"after": "garbage"}, 422, "cursor"),
    ]
    store = MemoryStore(home / "store", DIM)
    before = (store.stats(), store.kv())
    for name, method, path, headers, body, status, needle in bad:
        content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        r = httpx.request(method, svc.url + path, content=content, headers=headers, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert needle in error and "\n" not in error and "Traceback" not in error, (name, error)
    assert len(bad) >= 25
    assert (store.stats(), store.kv()) == before  # nothing was written


def test_2000_concurrent_writes_survive_a_sigkill_exactly_once(home, running):
    toml = _toml(home)
    svc = _service(running, toml)
    acked: dict[str, set[str]] = {}
    killed = threading.Event()

    def writer(w: int) -> None:
        c = MemoryClient(svc.url, svc.token(), retries=0, timeout_s=10)
        mine = acked.setdefault(f"w{w}", set())
        for i in range(500):
            eid = f"w{w}-{i}"
            try:
                c.add([f"text {eid}"], _vec(w * 1000 + i), ids=[eid], idempotency_key=eid)
                mine.add(eid)
            except MemoryServiceError:
                if killed.is_set():
                    return
        c.close()

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(writer, w) for w in range(4)]
            while sum(len(s) for s in acked.values()) < 600:
                time.sleep(0.05)
            killed.set()
            svc.kill()  # SIGKILL: CLI, Ray and every replica, mid-write
            for f in futures:
                f.result(timeout=120)
    finally:
        svc.kill()
    total = sum(len(s) for s in acked.values())
    assert 600 <= total < 2000
    again = ServeProcess(toml)
    try:
        c = MemoryClient(again.url, again.token())
        stored = [e for e in c.iterate(page=1000) if e["id"].startswith("w")]
        ids = [e["id"] for e in stored]
        assert len(ids) == len(set(ids))  # nothing twice
        assert set().union(*acked.values()) <= set(ids)  # every acknowledged write is there
        assert len({e["text"] for e in stored}) == len(stored)
        # Writers that retry every unacknowledged write with its idempotency key land it once, whether
        # or not it reached the log before the kill (a retried write that did returns the stored entry).
        done = set().union(*acked.values())

        def retry(w: int) -> None:
            for i in range(500):
                eid = f"w{w}-{i}"
                if eid not in done:
                    (entry,) = c.add([f"text {eid}"], _vec(w * 1000 + i), ids=[eid], idempotency_key=eid)
                    assert entry["id"] == eid and entry["version"] == 0

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(retry, range(4)))
        final = [e["id"] for e in c.iterate(page=1000) if e["id"].startswith("w")]
        assert len(final) == len(set(final)) == 2000
        c.close()
    finally:
        again.stop()


def test_cron_http_and_cli_consolidations_at_once_exactly_one_runs(home):
    tmp = home / "cons"
    tmp.mkdir()
    toml = _toml(tmp, schedule="* * * * * */2", distill_steps=15000)  # cron every 2 s; a run of many seconds
    texts, vecs, groups = clustered(n_clusters=8, n_single=8, dim=DIM, seed=3)
    store = MemoryStore(tmp / "store", DIM)
    ids = [e.id for e in store.add(texts, vecs)]
    svc = ServeProcess(toml)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the cron thread holds the lease
            holder = json.loads(store.kv().get("lease.consolidation.default", "{}"))
            if holder.get("owner", "").startswith("cron:"):
                break
            assert time.monotonic() < deadline, "the cron run never took the lease"
            time.sleep(0.05)
        c = MemoryClient(svc.url, svc.token())
        with ThreadPoolExecutor(2) as pool:
            http = pool.submit(lambda: httpx.post(svc.url + "/v1/consolidate", timeout=120,
                                                  headers={"Authorization": f"Bearer {svc.token()}"}))
            cli = pool.submit(lambda: subprocess.run(
                [sys.executable, "-m", "trainmem.launch.cli", "consolidate", str(toml), "--once", "--json"],
                cwd=REPO, capture_output=True, text=True, timeout=240))
            r, proc = http.result(), cli.result()
        assert r.status_code == 409 and r.json()["holder"]["owner"] == holder["owner"], r.text
        assert proc.returncode == 3 and holder["owner"] in proc.stderr, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1])["holder"]["owner"] == holder["owner"]
        while json.loads(store.kv()["layer.default"])["version"] < 1:  # the cron run commits version 1
            assert time.monotonic() < deadline + 180, "the cron run did not finish"
            time.sleep(0.2)
        assert representation(store) == {i: 1 for i in ids}  # one run merged everything, once
        chain = json.loads(store.kv()["layer.default"])
        assert chain["version"] == 1  # one distillation committed
        stats = c.stats()["consolidation"]
        assert stats["runs"] >= 1 and stats["last_error"] == ""
        c.close()
    finally:
        svc.stop()
