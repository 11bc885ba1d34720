"""Scale out: do an adapter's requests land on a replica that already has it in a slot?

A local Ray cluster runs the Serve deployment (server/scale/serve_ray.py) with 2 replicas of the
default model over a SeaweedFS store on loopback. 32 LoRA adapters (r16 on q,v) are uploaded, then
closed-loop clients send /generate requests whose adapter is drawn from a Zipf law (s = 1.0), the
same request sequence twice, each time on freshly started replicas (cold slots and host caches):

- routed by adapter: Serve's model multiplexing, multiplexed_model_id = owner/id;
- random routing (the baseline): the same deployment with multiplexing off (Serve's power of two
  choices by queue length).

Per case: the fraction of requests that arrived at a replica that had the adapter's version in a
slot already (`x-adapter-tier: slot`; over all requests and over the last 75%, after the cold
start), and per replica the requests served and the adapters it loaded into slots and into host
memory (its own counters). On one 2-core machine the replicas share the cores, so no speed-up over
one replica is expected; req/s is printed only to show both cases did the same work.

Usage: python benchmarks/scale_out.py [--replicas 2] [--adapters 32] [--requests 640] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, report_idle  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.model.hf_config import load_model_config  # noqa: E402
from server.scale.local_s3 import local_s3  # noqa: E402
from tests.live_server import free_port  # noqa: E402

PROMPT = "Write one sentence about the history of {}."
TOPICS = ["bread", "rivers", "clocks", "paper", "bridges", "music", "salt", "maps", "glass", "tea", "iron", "wool"]


def lora_files(model_dir: Path, rank: int, seed: int) -> tuple[bytes, bytes]:
    """A PEFT LoRA on q_proj and v_proj of every layer, shaped from the checkpoint's config."""
    c = load_model_config(model_dir)
    outs = {"q_proj": c.num_heads * c.head_dim, "v_proj": c.num_kv_heads * c.head_dim}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c.num_layers):
        for proj, out in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, c.hidden_size, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.02
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(outs), "bias": "none"}
    return json.dumps(config).encode(), save(tensors)


def zipf_sequence(n_adapters: int, n_requests: int, s: float, seed: int) -> list[int]:
    weights = [1 / (k + 1) ** s for k in range(n_adapters)]
    return random.Random(seed).choices(range(n_adapters), weights=weights, k=n_requests)


def run_traffic(url: str, picks: list[int], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """Closed loop: `clients` threads take the next pick until none is left; one record per request."""
    records: list[dict] = [{} for _ in picks]
    next_index = iter(range(len(picks)))
    lock = threading.Lock()

    errors: list[Exception] = []

    def client() -> None:
        try:
            send_all()
        except Exception as exc:  # surfaced by the caller once every client stopped
            errors.append(exc)

    def send_all() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                body = {
                    "prompt": PROMPT.format(TOPICS[i % len(TOPICS)]),
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                    "adapter_id": f"a{picks[i]}",
                }
                r = http.post(f"{url}/generate", json=body)
                r.raise_for_status()
                loads = dict(kv.split("=") for kv in r.headers["x-replica-adapter-loads"].split(","))
                records[i] = {
                    "replica": r.headers["x-replica"],
                    "tier": r.headers["x-adapter-tier"],
                    "slot_loads": int(loads["slot"]),
                    "host_loads": int(loads["host"]),
                }

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return records, time.perf_counter() - started


def summarize(name: str, records: list[dict], seconds: float) -> tuple[list[object], list[list[object]]]:
    tail = records[len(records) // 4 :]
    hit = sum(r["tier"] == "slot" for r in records) / len(records)
    hit_tail = sum(r["tier"] == "slot" for r in tail) / len(tail)
    row = [name, len(records), f"{hit:.1%}", f"{hit_tail:.1%}", len(records) / seconds]
    per: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        per[r["replica"]].append(r)
    replica_rows = []
    for i, (replica, mine) in enumerate(sorted(per.items())):
        adapters = len({r.get("adapter") for r in mine})
        replica_rows.append(
            [
                name,
                f"replica {i + 1} ({replica})",
                len(mine),
                adapters,
                f"{sum(r['tier'] == 'slot' for r in mine) / len(mine):.1%}",
                max(r["slot_loads"] for r in mine),
                max(r["host_loads"] for r in mine),
            ]
        )
    return row, replica_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import ray
    from ray import serve

    from server.scale.serve_ray import APP_NAME, build_app

    report_idle()
    print(
        f"torch {torch.__version__}, Ray {ray.__version__}, model {DEMO_MODEL_DIR.name}, {args.replicas} replicas "
        f"x 1 thread, {args.adapters} LoRA r{args.rank} adapters, Zipf s={args.zipf}, {args.requests} requests, "
        f"{args.clients} closed-loop clients, {args.max_tokens} new tokens each"
    )
    picks = zipf_sequence(args.adapters, args.requests, args.zipf, seed=0)
    with tempfile.TemporaryDirectory(prefix="scale-out-") as work, local_s3(Path(work) / "s3") as s3:
        config = ServerConfig(model=DEMO_MODEL_DIR, adapters_dir=s3.url("bench"), threads=1, log_level="warning")
        ray.init(num_cpus=args.replicas + 1, include_dashboard=False, log_to_driver=False)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
        try:
            serve.run(build_app(config, args.replicas, env=s3.env, route_by_adapter=False), name=APP_NAME)
            for k in range(args.adapters):
                cfg, weights = lora_files(DEMO_MODEL_DIR, args.rank, seed=k)
                files = {"config": ("adapter_config.json", cfg), "weights": ("adapter_model.safetensors", weights)}
                httpx.post(f"{url}/adapters", data={"adapter_id": f"a{k}"}, files=files, timeout=120).raise_for_status()
            serve.delete(APP_NAME)
            rows, replica_rows = [], []
            for name, by_adapter in (("routed by adapter", True), ("random routing", False)):
                app = build_app(config, args.replicas, env=s3.env, route_by_adapter=by_adapter)
                serve.run(app, name=APP_NAME)  # fresh replicas: cold slots and host caches
                records, seconds = run_traffic(url, picks, args.clients, args.max_tokens)
                for r, pick in zip(records, picks, strict=True):
                    r["adapter"] = pick
                row, per_replica = summarize(name, records, seconds)
                rows.append(row)
                replica_rows += per_replica
                serve.delete(APP_NAME)
        finally:
            serve.shutdown()
            ray.shutdown()
    print_table(["routing", "requests", "slot hits", "slot hits, last 75%", "req/s"], rows)
    print()
    print_table(
        ["routing", "replica", "requests", "adapters seen", "slot hits", "slot loads", "host loads"], replica_rows
    )


if __name__ == "__main__":
    main()
