"""Replicas on a real local Ray cluster (Ray Serve, 2 replicas of 1 thread each on the tiny model) over a
real S3-compatible store (SeaweedFS on loopback), driven through Serve's HTTP proxy: an upload through
any replica is usable on every replica, hot swaps and deletes reach them all within 2 s, keys are
forwarded, streams stream, and a killed replica is replaced with nothing published lost."""

from __future__ import annotations

import time

import httpx
import pytest
import ray
from ray import serve

from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.scale.serve_ray import APP_NAME, MULTIPLEX_HEADER, RouteKeys, adapter_name, build_app
from server.tenancy.keys import add_key
from tests.live_server import free_port, wait_until
from tests.seaweed import seaweed_s3
from tests.test_tenancy import _lora


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_served_model_dir):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {"acme": add_key(keys_file, "acme", "user"), "root": add_key(keys_file, "ops", "admin")}
    with seaweed_s3(tmp_path_factory.mktemp("seaweed")) as s3:
        config = ServerConfig(
            model=tiny_served_model_dir,
            dtype="float32",
            threads=1,
            adapters_dir=s3.url("ray"),
            api_keys=keys_file,
            log_level="warning",
            engine=EngineConfig(max_model_len=256, max_num_seqs=8, max_batched_tokens=256, kv_cache_gb=0.05),
            adapters=AdapterConfig(max_slots=4, host_cache_gb=0.1),
        )
        port = free_port()
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": s3.env})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config, replicas=2, env=s3.env), name=APP_NAME, route_prefix="/")
            yield f"http://127.0.0.1:{port}", keys
        finally:
            serve.shutdown()
            ray.shutdown()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _upload(url: str, key: str, adapter_id: str, seed: int) -> httpx.Response:
    config, weights = _lora(seed)
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    return httpx.post(f"{url}/adapters", headers=_auth(key), data={"adapter_id": adapter_id}, files=files, timeout=60)


def _generate(url: str, key: str, adapter: str | None, pin: str | None = None) -> httpx.Response:
    headers = _auth(key) | ({MULTIPLEX_HEADER: pin} if pin else {})
    body = {"prompt": "Hello there", "max_tokens": 6, "ignore_eos": True, "adapter_id": adapter}
    return httpx.post(f"{url}/generate", headers=headers, json=body, timeout=60)


def _on_every_replica(url: str, key: str, adapter: str) -> dict[str, list[int]]:
    """Generate with `adapter` on each replica (pinning fresh multiplex keys: Serve sends a key it has
    not seen to the replica with the fewest), until both replicas answered; {replica: token ids}."""
    seen: dict[str, list[int]] = {}
    for i in range(60):
        r = _generate(url, key, adapter, pin=f"probe-{time.monotonic_ns()}-{i}")
        assert r.status_code == 200, r.text
        seen[r.headers["x-replica"]] = r.json()["token_ids"]
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered")


def _versions_everywhere(url: str, key: str, name: str) -> dict[str, str | None]:
    """{replica: version of `name` it reports} from unpinned GETs (spread over the replicas)."""
    seen: dict[str, str | None] = {}
    for _ in range(30):
        r = httpx.get(f"{url}/adapters/{name}", headers=_auth(key), timeout=10)
        assert r.status_code in (200, 404), r.text
        seen[r.headers["x-replica"]] = r.json()["version"] if r.status_code == 200 else None
        if len(seen) == 2:
            break
    return seen


def _published_everywhere(url: str, key: str, adapter_id: str, seed: int) -> str:
    """Upload through the proxy; from its answer on, every replica must serve the new version within
    2 s. Its version."""
    r = _upload(url, key, adapter_id, seed)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    wait_until(lambda: set(_versions_everywhere(url, key, adapter_id).values()) == {version}, 2, "every replica")
    return version


def test_the_route_key_is_the_adapters_full_name(tmp_path, tiny_served_model_dir):
    keys_file = tmp_path / "keys.json"
    key = add_key(keys_file, "acme", "user")
    routes = RouteKeys(ServerConfig(model=tiny_served_model_dir, api_keys=keys_file))
    assert routes.key("my-lora", f"Bearer {key}") == "acme/my-lora"  # a bare id is the caller's
    assert routes.key("globex/shared", f"Bearer {key}") == "globex/shared"
    assert routes.key("my-lora", "Bearer sk-unknown") == ""  # no tenant: any replica answers 401
    assert routes.key(tiny_served_model_dir.name, f"Bearer {key}") == ""  # /v1's model = the base model
    assert routes.key("../x", f"Bearer {key}") == "" and routes.key(None, "") == ""
    body = b'{"model": "m", "adapter_id": "a"}'
    assert adapter_name("POST", "/generate", "application/json", body) == "a"
    assert adapter_name("POST", "/v1/chat/completions", "application/json", body) == "m"
    assert adapter_name("POST", "/generate", "application/json", b"not json") is None
    assert adapter_name("GET", "/adapters/a", "", b"") is None


def test_keys_are_forwarded_and_streams_stream(cluster):
    url, keys = cluster
    assert httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 401
    body = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/generate", headers=_auth(keys["acme"]), json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) == 6 and events[-1] == "data: [DONE]"


def test_an_upload_through_the_proxy_is_served_by_every_replica(cluster):
    url, keys = cluster
    _published_everywhere(url, keys["acme"], "shared", seed=1)
    outputs = _on_every_replica(url, keys["acme"], "shared")
    assert len(set(map(tuple, outputs.values()))) == 1  # the same adapter (greedy): the same tokens
    base = _generate(url, keys["acme"], None).json()["token_ids"]
    assert next(iter(outputs.values())) != base
    # Unpinned, the adapter's requests stay on one replica, which has it in a slot after the first.
    tiers = [_generate(url, keys["acme"], "shared") for _ in range(6)]
    assert len({t.headers["x-replica"] for t in tiers}) == 1
    assert [t.headers["x-adapter-tier"] for t in tiers[1:]] == ["slot"] * 5


def test_hot_swap_and_delete_reach_every_replica_within_2s(cluster):
    url, keys = cluster
    _published_everywhere(url, keys["acme"], "swapped", seed=2)
    before = _on_every_replica(url, keys["acme"], "swapped")
    _published_everywhere(url, keys["acme"], "swapped", seed=3)
    after = _on_every_replica(url, keys["acme"], "swapped")
    assert len(set(map(tuple, after.values()))) == 1 and set(map(tuple, after.values())) != set(
        map(tuple, before.values())
    )
    assert httpx.delete(f"{url}/adapters/swapped", headers=_auth(keys["acme"]), timeout=30).status_code == 204
    wait_until(lambda: set(_versions_everywhere(url, keys["acme"], "swapped").values()) == {None}, 2, "the delete")
    assert _generate(url, keys["acme"], "swapped", pin="after-delete").status_code == 404


def test_a_killed_replica_is_replaced_and_nothing_published_is_lost(cluster):
    url, keys = cluster
    for i in range(3):
        _published_everywhere(url, keys["acme"], f"kept-{i}", seed=10 + i)
    expected = {i: _generate(url, keys["acme"], f"kept-{i}").json()["token_ids"] for i in range(3)}
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "AdapterServer" in a["name"]]
    assert len(replicas) == 2
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    ray.kill(victim, no_restart=True)

    dead = replicas[0]["name"].rsplit("#", 1)[-1]  # the replica tag ends the actor's name

    def replaced() -> bool:  # two replicas answer through the proxy, neither of them the dead one
        answering = set(_versions_everywhere(url, keys["acme"], "kept-0"))
        return len(answering) == 2 and dead not in answering

    wait_until(replaced, 120, "Serve to replace the killed replica")
    listed = httpx.get(f"{url}/adapters", headers=_auth(keys["acme"]), timeout=10).json()["adapters"]
    assert {"kept-0", "kept-1", "kept-2", "shared"} <= {a["adapter_id"] for a in listed}
    for i in range(3):
        for tokens in _on_every_replica(url, keys["acme"], f"kept-{i}").values():
            assert tokens == expected[i]
