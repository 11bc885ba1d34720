"""Server configuration: frozen dataclasses, filled once from CLI flags (each with an env var)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from server.demo_model import CACHE_HOME, DEMO_MODEL_DIR

ENV_PREFIX = "ADAPTER_SERVER_"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_model_len: int | None = None
    """Longest prompt + completion, in tokens. Default: the model's context, capped at 4096."""
    max_num_seqs: int = 128
    """Most sequences running at once (each also needs KV blocks for its tokens)."""
    max_batched_tokens: int = 2048
    """Token budget of one engine step; longer prompts are prefilled in chunks of this size."""
    kv_cache_gb: float = 4.0
    """Memory for the KV cache: blocks of 16 token positions, taken as sequences grow."""
    prefix_caching: bool = True
    """Reuse the KV of prompt blocks computed before (same tenant, adapter version and prefix)."""
    batch_invariant: bool = False
    """A request's logits never depend on what shares its batch (kernels/invariant.py); costs throughput."""
    compile: bool = False
    """Compile the decode step at startup (server/model/fused_decode.py). The CLI turns it on
    (`--no-compile` to stay eager); in-process users (tests, benchmarks) get the eager reference unless
    they ask."""

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_batched_tokens < self.max_num_seqs:
            raise ValueError("max_batched_tokens must be >= max_num_seqs so every decode fits in one step")
        if self.kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    max_slots: int = 16
    """Adapters ready for the forward pass at once (LRU-evicted when unpinned)."""
    max_rank: int = 256
    """Largest adapter rank accepted at upload."""
    max_upload_mb: float = 256.0
    """Largest accepted upload body."""
    max_full_finetune_mb: float = 65536.0
    """Largest full fine-tune body (POST /adapters/full-finetune; streamed to disk, not held in memory)."""
    host_cache_gb: float = 4.0
    """Parsed adapters kept in host memory above the slots (re-read from disk when evicted)."""
    mode: str = "auto"
    """Default per-request adapter mode: auto | gathered | merged."""
    max_merge_wait_ms: float = 500.0
    """Longest a request is held back by a merged phase of another adapter."""

    def validate(self) -> None:
        if self.max_slots < 1 or self.max_rank < 1 or self.max_upload_mb <= 0 or self.host_cache_gb < 0:
            raise ValueError("adapter limits must be positive")
        if self.max_full_finetune_mb <= 0:
            raise ValueError("max_full_finetune_mb must be positive")
        if self.mode not in ("auto", "gathered", "merged"):
            raise ValueError(f"adapter mode must be auto, gathered or merged, not {self.mode!r}")
        if self.max_merge_wait_ms < 0:
            raise ValueError("max_merge_wait_ms must be >= 0")


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """Default per-tenant limits (a tenant's own come from `limits_file`)."""

    limits_file: Path | None = None
    """JSON {tenant: {max_adapters, max_adapter_bytes, max_running, max_queued}} overriding the defaults."""
    max_adapters: int = 1000
    """Adapters one tenant may store."""
    max_adapter_gb: float = 10.0
    """Adapter files one tenant may store, in GiB."""
    max_running: int = 0
    """Sequences of one tenant running at once; 0 = as many as the engine runs."""
    max_queued: int = 256
    """Requests of one tenant waiting beyond those running."""

    def validate(self) -> None:
        if min(self.max_adapters, self.max_running, self.max_queued) < 0 or self.max_adapter_gb < 0:
            raise ValueError("tenant limits must be >= 0")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model: Path = DEMO_MODEL_DIR
    """Hugging Face checkpoint directory (Llama family, safetensors). Default: the demo SmolLM2."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (auto: the first CUDA device when there is one, else the CPU)."""
    dtype: str = "auto"
    """float32 | bfloat16 | auto (bfloat16 where the device has native bf16 matmuls, else float32)."""
    host: str = "127.0.0.1"
    port: int = 8000
    adapters_dir: Path | str = CACHE_HOME / "adapters"
    """Where uploaded adapters are stored (versioned, crash-safe): a directory, or an `s3://bucket/prefix`
    URL shared by replicas (adapters_store/s3.py)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint of an s3:// adapters_dir (default: AWS_ENDPOINT_URL(_S3), else AWS)."""
    threads: int = 0
    """torch intra-op threads; 0 = the cores available to this process."""
    log_level: str = "info"
    max_request_mb: float = 4.0
    """Largest request body of every route but adapter uploads (which have max_upload_mb)."""
    cors_allow_origins: str = ""
    """Comma-separated browser origins allowed to call the API (CORS and cross-site writes); none by default."""
    api_keys: Path | None = None
    """JSON file of API key digests -> {tenant, role}; none = the server runs open, as one tenant."""
    max_queued: int = 1024
    """Requests waiting server-wide beyond those running; more are answered 429."""
    max_n: int = 16
    """Most choices (`n`) one OpenAI request may ask for."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM: how long running requests may take to finish before they are cut."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    tenants: TenantConfig = field(default_factory=TenantConfig)

    def validate(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, not {self.dtype!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if self.max_request_mb <= 0:
            raise ValueError("max_request_mb must be positive")
        if self.max_queued < 0 or self.max_n < 1 or self.shutdown_timeout_s < 0:
            raise ValueError("max_queued must be >= 0, max_n >= 1 and shutdown_timeout_s >= 0")
        self.engine.validate()
        self.adapters.validate()
        self.tenants.validate()

    @property
    def allowed_origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.cors_allow_origins.split(",") if o.strip())

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but torch sees no CUDA device")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if native_bf16(device) else torch.float32
        return getattr(torch, self.dtype)


def native_bf16(device: torch.device) -> bool:
    """bf16 only pays off with hardware bf16 matmuls; emulated bf16 is slower than float32 on CPUs."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def store_location(value: str) -> Path | str:
    """An s3:// URL stays a string (a Path would fold its "//"); anything else is a directory."""
    return value if value.startswith("s3://") else Path(value)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return value in ("true", "1", "yes", "on")


# One row per option: (flag, field path, type, help). The env var is ENV_PREFIX + FLAG_IN_CAPS.
_OPTIONS: list[tuple[str, str, type, str]] = [
    ("--model", "model", Path, "Hugging Face checkpoint directory (Llama family, safetensors)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N (auto: CUDA when present)"),
    ("--dtype", "dtype", str, "float32 | bfloat16 | auto (bf16 only with native bf16 matmuls)"),
    ("--host", "host", str, "interface to listen on"),
    ("--port", "port", int, "TCP port"),
    (
        "--adapters-dir",
        "adapters_dir",
        store_location,
        "where uploaded adapters are stored: a directory or s3://bucket/prefix",
    ),
    ("--s3-endpoint-url", "s3_endpoint_url", str, "S3-compatible endpoint of an s3:// adapters dir (default: AWS env)"),
    ("--threads", "threads", int, "torch intra-op threads, 0 = cores available to the process"),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
    ("--max-request-mb", "max_request_mb", float, "largest request body (adapter uploads: --max-upload-mb)"),
    (
        "--cors-allow-origins",
        "cors_allow_origins",
        str,
        "comma-separated browser origins allowed to call the API; empty = none (cross-site writes are refused)",
    ),
    ("--api-keys", "api_keys", Path, "JSON file of API key sha256 digests -> {tenant, role}; none = open"),
    ("--max-queued", "max_queued", int, "requests waiting server-wide beyond those running (more: 429)"),
    ("--max-n", "max_n", int, "most choices (n) one OpenAI request may ask for"),
    ("--shutdown-timeout-s", "shutdown_timeout_s", float, "on SIGTERM, how long running requests may finish"),
    ("--tenant-limits", "tenants.limits_file", Path, "JSON {tenant: {limit: value}} overriding the defaults"),
    ("--tenant-max-adapters", "tenants.max_adapters", int, "adapters one tenant may store"),
    ("--tenant-max-adapter-gb", "tenants.max_adapter_gb", float, "GiB of adapter files one tenant may store"),
    ("--tenant-max-running", "tenants.max_running", int, "sequences of one tenant running at once (0 = no cap)"),
    ("--tenant-max-queued", "tenants.max_queued", int, "requests of one tenant waiting beyond those running"),
    (
        "--max-model-len",
        "engine.max_model_len",
        int,
        "longest prompt + completion in tokens (default: model context capped at 4096)",
    ),
    ("--max-num-seqs", "engine.max_num_seqs", int, "most sequences running at once"),
    ("--max-batched-tokens", "engine.max_batched_tokens", int, "token budget of one engine step (prefill chunk)"),
    ("--kv-cache-gb", "engine.kv_cache_gb", float, "memory for the KV cache (blocks of 16 positions)"),
    (
        "--prefix-caching",
        "engine.prefix_caching",
        _flag,
        "reuse the KV of cached prompt blocks: true | false",
    ),
    (
        "--batch-invariant",
        "engine.batch_invariant",
        _flag,
        "a request's logits never depend on what shares its batch: true | false",
    ),
    (
        "--compile",
        "engine.compile",
        _flag,
        "compile the decode step at startup (torch.compile; --no-compile = eager): true | false",
    ),
    ("--max-slots", "adapters.max_slots", int, "adapters ready for the forward pass at once"),
    ("--max-lora-rank", "adapters.max_rank", int, "largest adapter rank accepted at upload"),
    ("--max-upload-mb", "adapters.max_upload_mb", float, "largest accepted adapter upload"),
    ("--max-full-finetune-mb", "adapters.max_full_finetune_mb", float, "largest full fine-tune body (to disk)"),
    ("--host-cache-gb", "adapters.host_cache_gb", float, "parsed adapters kept in host memory"),
    ("--adapter-mode", "adapters.mode", str, "default adapter mode: auto | gathered | merged"),
    (
        "--max-merge-wait-ms",
        "adapters.max_merge_wait_ms",
        float,
        "longest a request waits while another adapter is merged",
    ),
]


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="adapter-server", description="Multi-adapter LLM inference server.")
    # The server compiles its decode step unless told not to (EngineConfig's own default is eager).
    engine = EngineConfig(compile=True)
    defaults = {"": ServerConfig(), "engine": engine, "adapters": AdapterConfig(), "tenants": TenantConfig()}
    for flag, path, kind, help_text in _OPTIONS:
        group, _, name = path.rpartition(".")
        default = getattr(defaults[group], name)
        env = env_name(flag)
        parser.add_argument(
            flag,
            dest=path,
            type=kind,
            metavar=name.upper(),
            default=kind(os.environ[env]) if env in os.environ else default,
            help=f"{help_text} [env {env}; default: {default}]",
        )
    parser.add_argument(
        "--no-compile",
        dest="engine.compile",
        action="store_false",
        default=argparse.SUPPRESS,
        help="same as --compile false",
    )
    values = vars(parser.parse_args(argv))
    sections: dict[str, dict] = {"": {}, "engine": {}, "adapters": {}, "tenants": {}}
    for path, value in values.items():
        group, _, name = path.rpartition(".")
        sections[group][name] = value
    config = ServerConfig(
        engine=EngineConfig(**sections["engine"]),
        adapters=AdapterConfig(**sections["adapters"]),
        tenants=TenantConfig(**sections["tenants"]),
        **sections[""],
    )
    try:
        config.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return config
