"""Assemble a serving runtime from a config: model, tokenizer, KV cache, engine, metrics."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from adapters_store import AdapterRegistry, TenantStores
from kernels.backend import BACKENDS, describe_backend, select_backend
from kernels.lora_tokens import TokenLoraStack
from server.adapters.conversion.jobs import Converter
from server.adapters.frozen_base import FrozenBase
from server.adapters.host_cache import HostCache
from server.adapters.manager import AdapterManager
from server.adapters.packing import base_model_spec
from server.adapters.service import AdapterService
from server.adapters.slot_table import SlotTable
from server.config import ServerConfig, available_cores
from server.cpu_threads import CpuTurns
from server.engine.block_pool import NULL_BLOCK, BlockPool
from server.engine.engine import Engine
from server.engine.kv_cache import BLOCK_SIZE, KVCache, bytes_per_token
from server.engine.phases import PhaseController, PhasePolicy
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.errors import ModelLoadError
from server.metrics import Metrics
from server.model.fused_decode import FusedDecoder
from server.model.hf_config import load_model_config
from server.model.llama import LlamaModel
from server.model.loader import load_model
from server.model.tokenizer import TextTokenizer
from server.tenancy.keys import KeyFileError, KeyRing
from server.tenancy.limits import RequestGate, TenantLimits, TenantPolicy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    config: ServerConfig
    model: LlamaModel
    tokenizer: TextTokenizer
    engine: Engine
    metrics: Metrics
    adapters: AdapterService
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    gate: RequestGate  # requests in flight per tenant, against their limits
    converter: Converter  # adapter conversions and merges (one low-priority worker)
    keys: KeyRing | None = None  # None: the server runs open, every caller is the default tenant

    @property
    def model_name(self) -> str:
        """What clients call the base model: its directory's name (never the path)."""
        return self.config.model.resolve().name


BACKEND_ENV = "ADAPTER_SERVER_KERNEL_BACKEND"


def resolve_kernel_backend(device: torch.device) -> str:
    """The adapter-kernel backend for this process, decided once here: $ADAPTER_SERVER_KERNEL_BACKEND
    (torch|triton, for tests and benchmarks; triton on a CPU needs TRITON_INTERPRET=1) else
    `select_backend(device)` (triton on CUDA, torch otherwise)."""
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ModelLoadError(f"{BACKEND_ENV}={forced!r}: expected one of {BACKENDS}")
    return forced or select_backend(device)


def build_runtime(config: ServerConfig) -> Runtime:
    """Load and assemble everything on a short-lived helper thread, which may use every core (loading
    weights, the compile warm-up) and whose OpenMP team ends with it: a team that outlived the build on
    the caller's thread would slow every engine step (see server/cpu_threads.py)."""
    with ThreadPoolExecutor(1, thread_name_prefix="runtime-build") as pool:
        return pool.submit(_build_runtime, config).result()


def _build_runtime(config: ServerConfig) -> Runtime:
    torch.set_num_threads(config.threads or available_cores())
    try:
        device = config.torch_device()
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    dtype = config.torch_dtype(device)
    model_config = load_model_config(config.model)
    max_len = config.engine.max_model_len or min(model_config.max_position_embeddings, 4096)
    if max_len > model_config.max_position_embeddings and model_config.rope_scaling is None:
        raise ModelLoadError(
            f"max_model_len {max_len} exceeds the model's context ({model_config.max_position_embeddings})"
        )
    started = time.perf_counter()
    model = load_model(config.model, dtype, max_len, device)
    tokenizer = TextTokenizer(config.model)
    per_block = bytes_per_token(model_config, dtype) * BLOCK_SIZE
    num_blocks = int(config.engine.kv_cache_gb * 2**30) // per_block
    if (num_blocks - 1) * BLOCK_SIZE < max_len:  # block 0 is the null block
        raise ModelLoadError(
            f"kv_cache_gb={config.engine.kv_cache_gb} cannot hold one sequence of {max_len} tokens "
            f"({max_len * per_block / BLOCK_SIZE / 2**30:.3f} GiB); raise it or lower max_model_len"
        )
    kv_cache = KVCache.allocate(model_config, num_blocks, dtype, device)
    metrics = Metrics()
    tenants = _tenant_policy(config)
    gate = RequestGate(tenants, engine_capacity=config.engine.max_num_seqs, max_queued=config.max_queued)
    keys = _load_keys(config)
    adapter_cfg = config.adapters
    linears = model.adapted_linears()
    base = FrozenBase.capture(linears)  # before anything can merge: the weights as loaded
    spec = base_model_spec(linears, base, adapter_cfg.max_rank, int(adapter_cfg.max_upload_mb * 2**20))
    cache = HostCache(int(adapter_cfg.host_cache_gb * 2**30))
    turns = CpuTurns()
    service = AdapterService(
        _adapter_stores(config),
        AdapterRegistry(),
        cache,
        spec,
        observe_load_seconds=metrics.adapter_load_seconds.labels("host").observe,
        limits=tenants.limits,
        turns=turns,
    )
    recovered = service.recover()
    if getattr(service.stores, "shared", False):  # other replicas write there too: follow their changes
        from server.scale.sync import RegistrySync

        RegistrySync(service).start()
    table = SlotTable(adapter_cfg.max_slots)
    metrics.watch_tiers({"slot": table.counts, "host": cache.counts})
    scheduler = Scheduler(
        BlockPool(num_blocks, BLOCK_SIZE),
        config.engine.max_num_seqs,
        config.engine.max_batched_tokens,
        table,
        cache,
        running_cap=gate.running_cap,
        prefix_caching=config.engine.prefix_caching,
    )
    metrics.watch_prefix_cache(scheduler.blocks.counts)
    eos = frozenset(model_config.eos_token_ids)
    kernel_backend = resolve_kernel_backend(device)
    manager = AdapterManager(
        table,
        cache,
        linears,
        base,
        dtype,
        device,
        backend=kernel_backend,
        max_step_tokens=config.engine.max_batched_tokens,
    )
    runner = ModelRunner(
        model,
        kv_cache,
        manager,
        observe_slot_load=metrics.adapter_load_seconds.labels("slot").observe,
        batch_invariant=config.engine.batch_invariant,
        fused=_fused_decoder(config, model, kv_cache, kernel_backend, table.num_slots),
    )
    phases = PhaseController(PhasePolicy(max_wait_s=adapter_cfg.max_merge_wait_ms / 1000), manager)
    metrics.watch_phases(phases.counts)
    engine = Engine(runner, scheduler, tokenizer, metrics, max_len, eos, phases, turns)
    log.info(
        "loaded %s (%s on %s) in %.1fs: KV cache of %d blocks x %d tokens, up to %d sequences of %d tokens, "
        "%d threads, %d adapters in %s, kernel backend %s",
        config.model,
        dtype,
        device,
        time.perf_counter() - started,
        num_blocks - 1,
        BLOCK_SIZE,
        config.engine.max_num_seqs,
        max_len,
        torch.get_num_threads(),
        recovered,
        config.adapters_dir,
        describe_backend(kernel_backend, device),
    )
    if keys is None:
        log.warning("no API keys configured (--api-keys): the server is open, every caller is one tenant")
    else:
        log.info("%d API keys loaded from %s", len(keys), config.api_keys)
    # Conversions read the frozen base, never the live weights (a merged phase may hold an adapter).
    converter = Converter(service, model, base, tokenizer, max_len)
    return Runtime(config, model, tokenizer, engine, metrics, service, max_len, dtype, device, gate, converter, keys)


def _fused_decoder(
    config: ServerConfig, model: LlamaModel, kv_cache: KVCache, backend: str, num_slots: int
) -> FusedDecoder | None:
    """The compiled decode step, compiled now (startup) so no request waits for it; None when the
    engine runs eagerly (`--no-compile`, batch-invariant mode, or a compile that failed)."""
    if not config.engine.compile or config.engine.batch_invariant:
        return None
    weight = model.embed_tokens.weight
    # Token-form LoRA needs the torch backend's per-slot factors; the Triton backend's LoRA steps stay eager.
    lora = (
        TokenLoraStack(model.adapted_linears(), num_slots, weight.dtype, weight.device) if backend == "torch" else None
    )
    fused = FusedDecoder(model, kv_cache.keys, kv_cache.values, lora)
    null_rows = torch.arange(NULL_BLOCK * BLOCK_SIZE, (NULL_BLOCK + 1) * BLOCK_SIZE, device=weight.device)
    try:
        report = fused.warm_up(null_rows)
    except Exception:  # the eager path serves everything; a compiler failure must not stop the server
        log.exception("compiling the decode step failed; serving eagerly")
        return None
    finally:
        kv_cache.zero_blocks([NULL_BLOCK])  # the warm-up wrote into the null block, which must stay zero
    log.info("compiled the decode step (%s) in %.1fs", " + ".join(report.variants), report.seconds)
    return fused


def _adapter_stores(config: ServerConfig):
    """The adapter store: a local directory, or an s3:// URL shared by replicas (boto3 is imported
    only then)."""
    if str(config.adapters_dir).startswith("s3://"):
        from adapters_store.s3 import S3TenantStores

        return S3TenantStores(str(config.adapters_dir), config.s3_endpoint_url)
    return TenantStores(config.adapters_dir)


def _tenant_policy(config: ServerConfig) -> TenantPolicy:
    t = config.tenants
    defaults = TenantLimits(
        max_adapters=t.max_adapters,
        max_adapter_bytes=int(t.max_adapter_gb * 2**30),
        max_running=t.max_running,
        max_queued=t.max_queued,
    )
    try:
        return TenantPolicy.load(t.limits_file, defaults)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def _load_keys(config: ServerConfig) -> KeyRing | None:
    if config.api_keys is None:
        return None
    try:
        return KeyRing.load(config.api_keys)
    except KeyFileError as exc:
        raise ModelLoadError(str(exc)) from None
