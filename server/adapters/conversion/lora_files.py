"""Write a converted adapter as a standard PEFT LoRA (docs/conversion.md §5).

Every layer's scale is exactly 1: `lora_alpha` equals the layer's rank (`r` / `lora_alpha` for the
most common rank, `rank_pattern` / `alpha_pattern` for the others), without rsLoRA, so PEFT's
`alpha / r` is 1.0 and `B A` is the update itself. Pattern keys are the escaped full paths: PEFT
matches them with `re.match(rf"(.*\\.)?({key})$", path)`, which an escaped path matches only for
that path. `target_modules` lists the full paths of the layers kept (rank-0 layers are left out:
PEFT has no rank-0 LoRA layer). The conversion report rides along in adapter_config.json under
`conversion`: the server keeps the config bytes as uploaded, so it survives restarts with the
adapter, and PEFT 0.21.2 drops unknown config keys when it loads (with a warning).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch
from safetensors.torch import save

from adapters_store.tensors import KEY_PREFIX

from .truncate import ConvertedLayer

REPORT_KEY = "conversion"


def lora_files(layers: dict[str, ConvertedLayer], report: dict | None = None) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) bytes of a LoRA with these layers."""
    if not layers:
        raise ValueError("a LoRA needs at least one layer")
    ranks = {path: int(f.A.shape[0]) for path, f in layers.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    lora_bias = any(f.bias is not None for f in layers.values())
    tensors: dict[str, torch.Tensor] = {}
    for path, f in layers.items():
        key = KEY_PREFIX + path
        tensors[f"{key}.lora_A.weight"] = f.A.contiguous()
        tensors[f"{key}.lora_B.weight"] = f.B.contiguous()
        if lora_bias:
            tensors[f"{key}.lora_B.bias"] = f.bias if f.bias is not None else torch.zeros(f.B.shape[0])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": list(layers),
    }
    if report is not None:
        config[REPORT_KEY] = report
    return json.dumps(config, sort_keys=True).encode(), save(tensors, metadata={"format": "pt"})


def stored_report(config_bytes: bytes) -> dict | None:
    """The conversion report of a stored adapter's config, None for one that was not converted here."""
    try:
        report = json.loads(config_bytes).get(REPORT_KEY)
    except (ValueError, AttributeError):
        return None
    return report if isinstance(report, dict) else None
