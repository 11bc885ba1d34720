"""Where the time of one durable adapter upload goes, stage by stage.

Uploads a LoRA r16 on q,k,v,o of the demo model (SmolLM2-135M, 7.4 MB of float32 factors, as
PEFT saves them from a float32 fine-tune), each time with fresh random content, and reports medians:

* ``upload->ready (new id)``: ``runtime.adapters.upload`` end to end, uninstrumented, a new adapter id
  each time (what benchmarks/adapters.py measures);
* ``upload->ready (re-upload)``: the same for a hot swap of one id (new content each time), which also
  retires the previous version;
* a staged run that calls the steps of ``AdapterService.upload`` one by one (same order, same
  arguments) and splits them further:

  - parse: ``load_tensors`` (safetensors decode, float32, finite check), ``check_lora_update`` (the
    ||ΔW||_F validation math), the rest of the kind parser (config, targets, shapes);
  - canonical files, metadata (AdapterInfo);
  - publish: time inside sha256 (hash), inside ``os.fsync`` (fsync), inside ``os.replace`` /
    ``os.rename`` (replace), and everything else of ``AdapterStore.publish`` (other: open, write,
    mkdir, manifest/meta JSON, waiting for a helper thread). Found by wrapping the store module's
    ``os`` and ``hashlib``, so it measures any store implementation without its cooperation. Time
    those take on a helper thread of the store (overlapping the publishing thread, so not part of the
    publish time's sum) is shown on its own rows;
  - host cache put, registry register.

Cases run round-robin (staged, new id, re-upload, staged, ...) so drift and other processes' load hit
all of them alike; each row reports the median and the interquartile range (p25-p75) as its noise.
``--compare REV`` also runs adapters_store/{store,tensors,canonical}.py as of git revision REV (loaded
as separate modules, each with its own store directory), interleaved round by round with the working
tree's, alternating which goes first: a before/after table from one process under the same load.
Adapters stay stored (and cached up to ``--host-cache-gb``), as on a server that accumulates them;
``--delete`` deletes the staged and new-id ones after each round instead (the file system then reuses
the freed pages, which on some VMs makes buffered writes several times cheaper than writing into
pages never used before). The machine line says how busy the CPU was before the run: on a shared
machine, torch's two intra-op threads make the validation math (||ΔW|| check) swing from ~15 ms to
over a second; ``--threads 1`` shows the rest of the path without that.

The staged run copies the steps of ``AdapterService.upload`` (server/adapters/service.py); if that
method changes, update ``staged_upload`` to match.

Usage: python benchmarks/upload_path.py [--repeats 30] [--compare REV] [--threads N] [--delete]
                                        [--store DIR] [--dtype float32] [--host-cache-gb 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adapters_store.canonical as canonical_mod  # noqa: E402
import adapters_store.kinds.lora as lora_mod  # noqa: E402
import adapters_store.peft_config as peft_config_mod  # noqa: E402
import adapters_store.store as store_mod  # noqa: E402
import adapters_store.tensors as tensors_mod  # noqa: E402
import server.adapters.service as service_mod  # noqa: E402
from adapters_store import AdapterInfo, parse_adapter  # noqa: E402
from benchmarks.common import cpu_info, print_table, report_idle  # noqa: E402
from benchmarks.workload import lora_files  # noqa: E402
from server.config import AdapterConfig, EngineConfig, ServerConfig  # noqa: E402
from server.demo_model import DEMO_MODEL_DIR  # noqa: E402
from server.runtime import build_runtime  # noqa: E402

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def describe_machine(store_dir: Path) -> list[str]:
    """What the upload path's speed depends on beyond ``report_idle``: SHA extensions (sha256 of the
    weights), library versions, and the file system the store is on (fsync and O_DIRECT costs)."""
    _, flags = cpu_info()
    fs = "?"
    try:  # the longest mount point that contains the store directory
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind, opts = line.split()[:4]
            if str(store_dir.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{kind} on {dev} at {mnt} ({opts})"
    except OSError:
        pass
    versions = (
        f"sha_ni: {'yes' if 'sha_ni' in flags else 'no'}; kernel {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{ssl.OPENSSL_VERSION}"
    )
    return [versions, f"store: {store_dir} on {fs}"]


# ---------------------------------------------------------------------------------------------- timing
class Clock:
    """Accumulates seconds per stage name for the current upload; time spent on another thread than
    the one that made the clock (a store's helper thread) is booked under "<name> (helper thread)"."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.thread = threading.get_ident()

    def add(self, name: str, seconds: float) -> None:
        if threading.get_ident() != self.thread:
            name += " (helper thread)"
        self.t[name] += seconds

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] += time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        return timed


class _TimedHash:
    def __init__(self, clock: Clock, h) -> None:
        self._clock, self._h = clock, h

    def update(self, data) -> None:
        start = time.perf_counter()
        self._h.update(data)
        self._clock.add("publish: hash", time.perf_counter() - start)

    def __getattr__(self, name):  # digest, hexdigest, copy, ...
        attr = getattr(self._h, name)
        if not callable(attr):
            return attr
        return self._clock.wrap("publish: hash", attr)


def _timed_hashlib(clock: Clock) -> ModuleType:
    mod = ModuleType("hashlib")
    mod.__dict__.update(hashlib.__dict__)

    def sha256(data=b"", **kw):
        start = time.perf_counter()
        h = hashlib.sha256(data, **kw)
        clock.add("publish: hash", time.perf_counter() - start)
        return _TimedHash(clock, h)

    mod.sha256 = sha256
    if hasattr(hashlib, "file_digest"):
        mod.file_digest = clock.wrap("publish: hash", hashlib.file_digest)
    return mod


def _timed_os(clock: Clock) -> ModuleType:
    mod = ModuleType("os")
    mod.__dict__.update(os.__dict__)
    for name in ("fsync", "fdatasync"):
        if hasattr(os, name):
            setattr(mod, name, clock.wrap("publish: fsync", getattr(os, name)))
    for name in ("replace", "rename"):
        setattr(mod, name, clock.wrap("publish: replace", getattr(os, name)))
    return mod


@dataclass
class Variant:
    """One implementation of the store/tensors/canonical modules, with its own store directory."""

    name: str
    store_mod: ModuleType
    tensors_mod: ModuleType
    canonical_mod: ModuleType
    store: object = None

    @contextmanager
    def active(self, service):
        """Route ``service`` (and the parser) through this variant's modules."""
        saved = [
            (service, "store", service.store),
            (peft_config_mod, "load_tensors", peft_config_mod.load_tensors),
            (peft_config_mod, "read_metadata", peft_config_mod.read_metadata),
            (service_mod, "canonical_files", service_mod.canonical_files),
        ]
        service.store = self.store
        peft_config_mod.load_tensors = self.tensors_mod.load_tensors
        peft_config_mod.read_metadata = self.tensors_mod.read_metadata
        service_mod.canonical_files = self.canonical_mod.canonical_files
        try:
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)


def load_revision(rev: str) -> Variant:
    """adapters_store/{store,tensors,canonical}.py as of git revision ``rev``, as separate modules."""
    mods = {}
    for name in ("store", "tensors", "canonical"):
        src = subprocess.check_output(["git", "show", f"{rev}:adapters_store/{name}.py"], cwd=ROOT)
        module = ModuleType(f"adapters_store._rev_{name}")
        module.__package__ = "adapters_store"
        module.__file__ = f"{rev}:adapters_store/{name}.py"
        sys.modules[module.__name__] = module  # dataclasses & co. look modules up by name
        exec(compile(src, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own file at REV
        mods[name] = module
    return Variant(rev, mods["store"], mods["tensors"], mods["canonical"])


@contextmanager
def instrumented(clock: Clock, variant: Variant):
    """Time the parse and publish internals: swap in timing wrappers, put the originals back after."""
    smod = variant.store_mod
    saved = [
        (smod, "os", smod.os),
        (smod, "hashlib", smod.hashlib),
        (peft_config_mod, "load_tensors", peft_config_mod.load_tensors),
        (lora_mod, "check_lora_update", lora_mod.check_lora_update),
    ]
    smod.os = _timed_os(clock)
    smod.hashlib = _timed_hashlib(clock)
    peft_config_mod.load_tensors = clock.wrap("parse: load tensors", peft_config_mod.load_tensors)
    lora_mod.check_lora_update = clock.wrap("parse: ||dW|| check", lora_mod.check_lora_update)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def staged_upload(service, variant: Variant, adapter_id: str, config: bytes, weights: bytes) -> dict[str, float]:
    """AdapterService.upload's steps, one by one (same calls, same order, same lock), timed."""
    clock = Clock()
    start = time.perf_counter()
    with instrumented(clock, variant):
        with clock.stage("parse (total)"):
            store_mod.validate_adapter_id(adapter_id)
            parsed = parse_adapter(config, weights, service.spec)
        with clock.stage("canonical files"):
            files = variant.canonical_mod.canonical_files(config, weights, parsed)
        with clock.stage("metadata"):
            meta = AdapterInfo.from_parsed(adapter_id, "", parsed, created_at=time.time()).to_dict()
            del meta["version"]
            meta["bytes"] = sum(len(data) for data in files.values())
        with service._write_lock:  # store mutations are ordered by this lock, memory state by _lock
            with clock.stage("publish (total)"):
                version = service.store.publish(adapter_id, files, {"info": meta})
            info = AdapterInfo.from_dict({**meta, "version": version})
            with service._lock:
                with clock.stage("cache put"):
                    service.cache.put(version, parsed)
                with clock.stage("register"):
                    previous = service.registry.register(info)
                    service._published[version] += 1
                    assert previous is None
    t = dict(clock.t)
    t["total (staged)"] = time.perf_counter() - start
    t["parse: kind parser, rest"] = t["parse (total)"] - t["parse: load tensors"] - t["parse: ||dW|| check"]
    t["publish: other (write, dirs, json, waits)"] = (
        t["publish (total)"]
        - t.get("publish: hash", 0.0)
        - t.get("publish: fsync", 0.0)
        - t.get("publish: replace", 0.0)
    )
    return t


ORDER = [
    "parse (total)",
    "parse: load tensors",
    "parse: ||dW|| check",
    "parse: kind parser, rest",
    "canonical files",
    "metadata",
    "publish (total)",
    "publish: other (write, dirs, json, waits)",
    "publish: hash",
    "publish: fsync",
    "publish: replace",
    "publish: hash (helper thread)",
    "publish: fsync (helper thread)",
    "cache put",
    "register",
    "total (staged)",
    "upload->ready (new id)",
    "upload->ready (re-upload)",
]


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="round-robin rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--store", type=Path, default=None, help="store directory (default: a new temp dir)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = the server default)")
    parser.add_argument("--host-cache-gb", type=float, default=1.0)
    parser.add_argument("--delete", action="store_true", help="delete the staged and new-id adapters each round")
    parser.add_argument(
        "--compare",
        metavar="REV",
        default=None,
        help="also run adapters_store/{store,tensors,canonical}.py of git revision REV, "
        "interleaved with the working tree's (same process, alternating order)",
    )
    args = parser.parse_args()

    report_idle()
    root = args.store or Path(tempfile.mkdtemp(prefix="upload-path-"))
    runtime = build_runtime(
        ServerConfig(
            model=args.model,
            dtype=args.dtype,
            adapters_dir=root / "store",
            threads=args.threads,
            engine=EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_gb=0.25),
            adapters=AdapterConfig(max_slots=4, host_cache_gb=args.host_cache_gb),
        )
    )
    for line in describe_machine(root):
        print(line)
    service = runtime.adapters
    variants = [Variant("working tree", store_mod, tensors_mod, canonical_mod)]
    if args.compare:
        variants.insert(0, load_revision(args.compare))
    for v in variants:
        v.store = v.store_mod.AdapterStore(root / f"store-{len(variants)}-{v.name.replace(' ', '-')}")
    rounds = args.warmup + args.repeats
    config, weights = lora_files(runtime, 16, QKVO, seed=1)
    print(
        f"adapter: LoRA r16 q,k,v,o, {len(weights) / 1e6:.2f} MB safetensors, {args.dtype} model; "
        f"{args.repeats} round-robin rounds after {args.warmup} warm-up rounds; "
        f"variants: {', '.join(v.name for v in variants)}"
    )
    for v in variants:
        with v.active(service):
            service.upload(f"swap-{id(v)}", config, weights)

    samples = {v.name: defaultdict(list) for v in variants}
    seed = 10_000
    for r in range(rounds):
        # Fresh content for every upload: 3 adapters per round and variant (staged, new id, re-upload).
        uploads = [lora_files(runtime, 16, QKVO, seed=seed + i) for i in range(3 * len(variants))]
        seed += len(uploads)
        for v in variants if r % 2 == 0 else variants[::-1]:  # alternate who goes first
            (c0, w0), (c1, w1), (c2, w2) = uploads[:3]
            del uploads[:3]
            with v.active(service):
                staged = staged_upload(service, v, f"staged-{id(v)}-{r}", c0, w0)
                start = time.perf_counter()
                service.upload(f"new-{id(v)}-{r}", c1, w1)
                new_id = time.perf_counter() - start
                start = time.perf_counter()
                service.upload(f"swap-{id(v)}", c2, w2)
                swap = time.perf_counter() - start
                if args.delete:
                    for adapter_id in (f"staged-{id(v)}-{r}", f"new-{id(v)}-{r}"):
                        service.delete(adapter_id)
            if r < args.warmup:
                continue
            for name, value in staged.items():
                samples[v.name][name].append(value)
            samples[v.name]["upload->ready (new id)"].append(new_id)
            samples[v.name]["upload->ready (re-upload)"].append(swap)

    rows = []
    for name in ORDER:
        row = [name]
        for v in variants:
            xs = samples[v.name].get(name)
            if not xs:
                row += ["", ""]
                continue
            p25, med, p75 = quartiles([x * 1e3 for x in xs])
            row += [f"{med:.2f}", f"{p25:.2f}-{p75:.2f}"]
        if any(row[1:]):
            rows.append(row)
    headers = ["stage (ms)"]
    for v in variants:
        headers += [f"{v.name}: median", "p25-p75"]
    print_table(headers, rows)
    print(f"load average after the run {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
