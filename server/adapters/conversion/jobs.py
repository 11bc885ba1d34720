"""Conversions and merges as jobs: read the sources, truncate, check the logits, publish (docs/conversion.md).

Jobs run one at a time on their own thread, at low priority and on one core (threads.py): SVDs and
weight reads never touch the event loop, never take the engine's cores, and two large conversions
never compete for memory. A job takes no lock that requests need: it reads stored files through the
store, parses them like the loader does, and publishes the result through the adapter service's
upload worker, so the converted adapter is validated and stored exactly like an upload
(`AdapterService.submit_upload`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store import AdapterInfo, ParsedAdapter, parse_adapter
from adapters_store.canonical import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.frozen_base import FrozenBase
from server.adapters.service import AdapterService
from server.cpu_threads import background_thread
from server.model.llama import LlamaModel
from server.model.tokenizer import TextTokenizer

from .budget import Target
from .combine import Combination, MergedUpdates
from .errors import ConversionRefused
from .full_finetune import FullFineTune
from .lora_files import lora_files, stored_report
from .reference import MAX_PROMPT_TOKENS, PROMPTS, ReferenceModel, compare
from .report import totals
from .spectrum import DEFAULT_SVD, SvdConfig
from .truncate import Truncation, truncate
from .updates import AdapterUpdates, UpdateSource

_REPORTS_KEPT = 1024  # versions whose report (or lack of one) is remembered for GET


@dataclass(frozen=True, slots=True)
class ConversionResult:
    info: AdapterInfo
    report: dict
    seconds: float


class Converter:
    def __init__(
        self,
        adapters: AdapterService,
        model: LlamaModel,
        base: FrozenBase,
        tokenizer: TextTokenizer,
        max_model_len: int,
        svd: SvdConfig = DEFAULT_SVD,
    ) -> None:
        self.adapters = adapters
        self.spec = adapters.spec
        self.model = model
        self.base = base
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.svd = svd
        self._reference: ReferenceModel | None = None
        self._reports: OrderedDict[str, dict | None] = OrderedDict()
        self._reports_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="adapter-convert", initializer=background_thread)
        self._bias_rows = {
            s.path: (linear, slice(s.out_start, s.out_start + s.out_features))
            for linear in model.adapted_linears()
            for s in linear.slices
        }

    # ---- jobs (each returns a Future; the work runs on the conversion thread) --------------------
    def convert(self, info: AdapterInfo, target_id: str, target: Target, owner: str) -> Future[ConversionResult]:
        def job() -> ConversionResult:
            source = AdapterUpdates(self._parse(info), self.spec.layers, self.spec.weight)
            return self._run(source, target, _describe(info), target_id, owner)

        return self._worker.submit(job)

    def merge(
        self,
        infos: list[AdapterInfo],
        weights: list[float],
        how: Combination,
        target_id: str,
        target: Target,
        owner: str,
    ) -> Future[ConversionResult]:
        def job() -> ConversionResult:
            parsed = [self._parse(info) for info in infos]
            biased = [
                i.adapter_id
                for i, p in zip(infos, parsed)
                if any(getattr(f, "bias", None) is not None for f in p.layers.values())
            ]
            if biased:
                raise ConversionRefused(f"adapters with a lora_bias cannot be merged: {biased}")
            sources = [AdapterUpdates(p, self.spec.layers, self.spec.weight) for p in parsed]
            source = MergedUpdates(sources, weights, how, list(self.spec.layers))
            provenance = {
                "kind": "merge",
                **how.to_dict(),
                "sources": [{**_describe(i), "weight": w} for i, w in zip(infos, weights)],
            }
            return self._run(source, target, provenance, target_id, owner)

        return self._worker.submit(job)

    def convert_full(
        self, file: Path, targets: list[str] | None, target_id: str, target: Target, owner: str
    ) -> Future[ConversionResult]:
        def job() -> ConversionResult:
            source = FullFineTune(file, self.spec.layers, self.spec.weight, self._base_bias, targets)
            return self._run(source, target, source.describe(), target_id, owner)

        return self._worker.submit(job)

    def drain(self) -> None:
        """Wait until every job accepted so far has published or failed (server shutdown)."""
        self._worker.submit(lambda: None).result()  # one FIFO worker: runs after them all

    # ---- reports of stored adapters --------------------------------------------------------------
    def report(self, info: AdapterInfo) -> dict | None:
        """The conversion report stored with `info`'s version (None: not made by a conversion).
        Reads the store on a miss: call it off the event loop."""
        with self._reports_lock:
            if info.version in self._reports:
                self._reports.move_to_end(info.version)
                return self._reports[info.version]
        config = self.adapters.stores.store(info.tenant).read(info.adapter_id, info.version)[CONFIG_FILE]
        report = stored_report(config)
        self._remember(info.version, report)
        return report

    def _remember(self, version: str, report: dict | None) -> None:
        with self._reports_lock:
            self._reports[version] = report
            while len(self._reports) > _REPORTS_KEPT:
                self._reports.popitem(last=False)

    # ---- the steps of a job ----------------------------------------------------------------------
    def _parse(self, info: AdapterInfo) -> ParsedAdapter:
        files = self.adapters.stores.store(info.tenant).read(info.adapter_id, info.version)
        return parse_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], self.spec)

    def _base_bias(self, path: str) -> torch.Tensor | None:
        linear, rows = self._bias_rows[path]
        bias = self.base.bias(linear)
        return None if bias is None else bias[rows]

    def _run(
        self, source: UpdateSource, target: Target, provenance: dict, target_id: str, owner: str
    ) -> ConversionResult:
        started = time.perf_counter()
        result = truncate(source, target, self.spec.max_rank, self.svd)
        if not result.factors:
            raise ConversionRefused(
                "every layer gets rank 0 (the update is zero, or the target keeps nothing): "
                "there is no adapter to publish"
            )
        report = {
            "source": provenance,
            "target": target.to_dict(),
            "max_lora_rank": self.spec.max_rank,
            "totals": totals(result.layers),
            "logits": self._logits(source, result),
            "layers": [layer.to_dict() for layer in result.layers],
        }
        config_bytes, weights_bytes = lora_files(result.factors, report)
        info = self.adapters.submit_upload(target_id, config_bytes, weights_bytes, owner).result()
        self._remember(info.version, report)
        return ConversionResult(info, report, time.perf_counter() - started)

    def _logits(self, source: UpdateSource, result: Truncation) -> dict:
        """Source vs converted on the fixed prompts, both applied as merged mode applies them."""
        if self._reference is None:
            self._reference = ReferenceModel(self.model, self.base)
        longest = min(MAX_PROMPT_TOKENS, self.max_model_len)
        prompts = [self.tokenizer.encode(text)[:longest] for text in PROMPTS]
        changed = {layer.path for layer in source.layers}

        def source_delta(path: str):
            if path not in changed:
                return None
            u = source.update(path)
            return u.matrix().float(), None if u.bias is None else u.bias.float()

        def converted_delta(path: str):
            f = result.factors.get(path)
            return None if f is None else (f.B @ f.A, f.bias)

        return compare(self._reference, prompts, source_delta, converted_delta)


def _describe(info: AdapterInfo) -> dict:
    return {"kind": info.kind, "adapter": str(info.ref), "version": info.version}
