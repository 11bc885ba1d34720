"""Build genuine PEFT adapters (saved with save_pretrained) and read our own logits with them."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from kernels.batch import TokenGroup
from server.adapters.frozen_base import FrozenBase
from server.adapters.host_cache import HostCache
from server.adapters.manager import AdapterManager
from server.adapters.slot_table import SlotTable
from server.model.context import ForwardContext
from server.model.llama import LlamaModel

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def perturb(peft_model, seed: int, scale: float) -> None:
    """Trained-looking adapters: every trainable tensor gets seeded noise so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * noise)
            else:
                p.copy_(scale * noise)


def save_peft_adapter(
    base_model, config, out_dir: Path, seed: int, scale: float = 0.02, rank_pattern: dict | None = None
) -> tuple[bytes, bytes]:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base_model), config)
        perturb(peft_model, seed, scale)
        if rank_pattern is not None:
            peft_model.peft_config["default"].rank_pattern = rank_pattern
        peft_model.save_pretrained(out_dir)
    return (out_dir / "adapter_config.json").read_bytes(), (out_dir / "adapter_model.safetensors").read_bytes()


def load_peft(base_model, adapter_dir: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dir).eval()


def train_adalora(base_model, out_dir: Path, steps: int = 6) -> tuple[bytes, bytes]:
    """A few real AdaLoRA training steps, so the saved rank pattern comes from its own allocator."""
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(
        init_r=6, target_r=2, lora_alpha=12, tinit=1, tfinal=1, deltaT=1, total_step=steps, target_modules=ALL_TARGETS
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base_model), config)
        perturb(model, seed=5, scale=0.02)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        for step in range(steps):
            ids = torch.randint(0, vocab, (2, 12), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
        model.eval()
        model.save_pretrained(out_dir)
    return (out_dir / "adapter_config.json").read_bytes(), (out_dir / "adapter_model.safetensors").read_bytes()


def pristine(runtime):
    """The runtime's model with base weights (an earlier engine run may have left an adapter merged)."""
    runtime.engine.restore_base()
    return runtime.model


def our_logits(model: LlamaModel, ids: torch.Tensor, parsed=None) -> torch.Tensor:
    """Prefill logits [n, vocab] of our decoder, with one adapter applied to every token."""
    cfg = model.config
    n = len(ids)
    keys = [torch.zeros(n, cfg.num_kv_heads, cfg.head_dim) for _ in range(cfg.num_layers)]
    values = [torch.zeros_like(k) for k in keys]
    adapters = None
    if parsed is not None:  # through the same slot loading and per-step planning the engine uses
        cache = HostCache(max_bytes=2**40)
        cache.put("v", parsed)
        table = SlotTable(1)
        table.acquire("v")
        linears = model.adapted_linears()
        manager = AdapterManager(table, cache, linears, FrozenBase.capture(linears), torch.float32)
        manager.load_pending()
        adapters = manager.plan([TokenGroup(0, 0, n)], n)
    ctx = ForwardContext.prefills_only([ids], adapters)
    return model(ctx, keys, values)
