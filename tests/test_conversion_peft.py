"""Conversions against PEFT (the oracle) on a tiny random Llama with biases: the exact update of every
kind, exact conversions, the converted files as PEFT loads them and as we serve them, merges against
`add_weighted_adapter`, and full fine-tunes with planted spectra."""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import save_file

from adapters_store import parse_adapter
from adapters_store.canonical import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.conversion import Combination, Target
from server.adapters.conversion.updates import AdapterUpdates
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.runtime import build_runtime
from tests.conftest import build_tiny_llama
from tests.peft_helpers import load_peft, our_logits, pristine, save_peft_adapter

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = [*QKVO, "down_proj"]


@pytest.fixture(scope="module")
def model_dir(demo_model_dir, tmp_path_factory):
    """Two layers, hidden 64, biases on every projection, the demo tokenizer (the conversion report
    runs fixed prompts through it)."""
    path = build_tiny_llama(
        tmp_path_factory.mktemp("tiny-biased"),
        seed=3,
        vocab_size=49152,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=True,
        mlp_bias=True,
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (demo_model_dir / name).exists():
            shutil.copy(demo_model_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def runtime(model_dir, tmp_path_factory):
    return build_runtime(
        ServerConfig(
            model=model_dir,
            dtype="float32",
            adapters_dir=tmp_path_factory.mktemp("conversion-store"),
            engine=EngineConfig(max_model_len=128, max_num_seqs=2, kv_cache_gb=0.05),
            adapters=AdapterConfig(max_rank=48),
        )
    )


@pytest.fixture(scope="module")
def converter(runtime):
    return runtime.converter


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def peft_configs():
    from peft import AdaLoraConfig, LoraConfig, RandLoraConfig, VeraConfig

    with warnings.catch_warnings():  # VeRA warns that save_projection=False relies on the seed: that is the point
        warnings.simplefilter("ignore")
        return {
            "lora": LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
            "lora-bias": LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=QKVO),
            "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS),
            "adalora": AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12, total_step=10, target_modules=TARGETS),
            "vera": VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=5, save_projection=False),
            "randlora": RandLoraConfig(r=8, randlora_alpha=16, target_modules=QKVO, projection_prng_key=2),
        }


@pytest.fixture(scope="module")
def sources(runtime, hf, tmp_path_factory):
    """name -> (AdapterInfo, PEFT model of the uploaded files)."""
    out = {}
    for i, (name, config) in enumerate(peft_configs().items()):
        d = tmp_path_factory.mktemp(name)
        config_bytes, weights = save_peft_adapter(hf, config, d, seed=20 + i, scale=0.1)
        out[name] = (runtime.adapters.upload(f"src-{name}", config_bytes, weights), load_peft(hf, d))
    return out


def peft_updates(peft_model, paths) -> dict[str, torch.Tensor]:
    """What PEFT's merge writes into each layer, minus W0 (float64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(peft_model).merge_and_unload()
    base = peft_model.get_base_model()
    out = {}
    for path in paths:
        w0 = base.get_submodule(path).base_layer.weight
        out[path] = merged.get_submodule(path).weight.double() - w0.double()
    return out


def stored_files(runtime, info, tmp_path):
    files = runtime.adapters.stores.store(info.tenant).read(info.adapter_id, info.version)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


@pytest.mark.parametrize("kind", ["lora", "lora-bias", "dora", "adalora", "vera", "randlora"])
def test_effective_update_of_every_kind_is_what_peft_merges(runtime, sources, kind):
    info, peft_model = sources[kind]
    files = runtime.adapters.stores.store(info.tenant).read(info.adapter_id, info.version)
    spec = runtime.adapters.spec
    updates = AdapterUpdates(parse_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], spec), spec.layers, spec.weight)
    theirs = peft_updates(peft_model, [layer.path for layer in updates.layers])
    assert len(theirs) >= 8
    for path, expected in theirs.items():
        ours = updates.update(path).matrix()
        scale = float(expected.abs().max())
        assert scale > 1e-3
        assert (ours - expected).abs().max() <= 2e-6 * max(scale, 1.0), path
    if kind == "dora":  # g ⊙ (W0 + sBA) − W0 is full rank, unlike sBA
        assert torch.linalg.matrix_rank(updates.update(theirs.__iter__().__next__()).matrix()) > 4


@pytest.mark.parametrize("rank", [8, 12])
def test_a_rank_r_lora_converted_at_rank_r_or_more_is_exact(runtime, converter, hf, sources, tmp_path, rank):
    info, peft_model = sources["lora"]
    result = converter.convert(info, f"exact-{rank}", Target(rank=rank), info.tenant).result()
    report = result.report
    assert {layer["rank"] for layer in report["layers"]} == {8}  # never above the source's rank
    assert report["totals"]["frobenius_error"] == 0.0 and report["totals"]["spectral_error_rel_max"] == 0.0
    assert report["logits"]["max_logit_diff"] < 1e-4 < report["logits"]["source_max_logit_change"]
    stored_files(runtime, result.info, tmp_path)
    converted = load_peft(hf, tmp_path)
    paths = [layer["path"] for layer in report["layers"]]
    source, ours = peft_updates(peft_model, paths), peft_updates(converted, paths)
    for path in paths:
        assert (ours[path] - source[path]).abs().max() < 1e-6


def test_serving_the_converted_adapter_equals_peft_loading_its_file(runtime, converter, hf, sources, tmp_path):
    """An energy target on DoRA gives uneven ranks (rank_pattern / alpha_pattern, scale exactly 1):
    PEFT must load the file with those ranks, and our served logits must equal PEFT's."""
    info, dora = sources["dora"]
    result = converter.convert(info, "dora-90", Target(energy=0.9), info.tenant).result()
    ranks = {layer["path"]: layer["rank"] for layer in result.report["layers"]}
    assert len(set(ranks.values())) > 1
    files = stored_files(runtime, result.info, tmp_path)
    converted = load_peft(hf, tmp_path)
    for path, rank in ranks.items():
        module = converted.get_submodule("base_model.model." + path)
        if rank == 0:
            assert not hasattr(module, "lora_A")
            continue
        assert module.lora_A["default"].weight.shape[0] == rank and module.scaling["default"] == 1.0
    ids = torch.randint(0, 49152, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = converted(ids[None]).logits[0]
    served = parse_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], runtime.adapters.spec)
    ours = our_logits(pristine(runtime), ids, served)
    assert (ours - theirs).abs().max().item() < 1e-5
    # The report's errors are Eckart–Young's on the exact DoRA update, as PEFT merges it.
    exact = peft_updates(dora, ranks)
    for layer in result.report["layers"]:
        sigma = torch.linalg.svdvals(exact[layer["path"]])
        r = layer["rank"]
        assert layer["sigma_next"] == pytest.approx(float(sigma[r]), rel=1e-4)
        assert layer["frobenius_error"] == pytest.approx(float(sigma[r:].norm()), rel=1e-4)
    assert result.report["totals"]["energy_kept"] >= 0.9


def test_lora_bias_survives_conversion(runtime, converter, hf, sources, tmp_path):
    info, peft_model = sources["lora-bias"]
    result = converter.convert(info, "bias-2", Target(rank=2), info.tenant).result()
    stored_files(runtime, result.info, tmp_path)
    converted = load_peft(hf, tmp_path)
    assert converted.peft_config["default"].lora_bias
    for layer in result.report["layers"]:
        path = "base_model.model." + layer["path"]
        expected = (
            peft_model.get_submodule(path).lora_B["default"].bias * peft_model.get_submodule(path).scaling["default"]
        )
        assert torch.allclose(converted.get_submodule(path).lora_B["default"].bias, expected, atol=1e-7)


@pytest.mark.parametrize("method, peft_method", [("linear", "svd"), ("ties", "ties_svd")])
def test_merge_equals_peft_add_weighted_adapter(runtime, converter, hf, tmp_path, method, peft_method):
    from peft import LoraConfig

    infos, dirs = [], []
    for i in range(2):
        d = tmp_path / f"m{i}"
        files = save_peft_adapter(hf, LoraConfig(r=4, lora_alpha=8, target_modules=QKVO), d, seed=40 + i, scale=0.1)
        infos.append(runtime.adapters.upload(f"merge-src-{method}-{i}", *files))
        dirs.append(d)
    weights, rank = [0.7, -0.4], 6
    how = Combination(method, None if method == "linear" else 0.5)
    result = converter.merge(infos, weights, how, f"merged-{method}", Target(rank=rank), "default").result()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = load_peft(hf, dirs[0])
        peft_model.load_adapter(dirs[1], adapter_name="b")
        peft_model.add_weighted_adapter(
            ["default", "b"], weights, "m", combination_type=peft_method, svd_rank=rank, density=how.density
        )
    out = tmp_path / "out"
    out.mkdir()
    stored_files(runtime, result.info, out)
    ours = load_peft(hf, out)
    for layer in result.report["layers"]:
        path = "base_model.model." + layer["path"]
        theirs = peft_model.get_submodule(path).get_delta_weight("m")
        mine = ours.get_submodule(path).get_delta_weight("default")
        assert (mine - theirs).abs().max() < 1e-5 * max(1.0, float(theirs.abs().max())), path
    assert result.report["source"]["method"] == method


def test_merge_refuses_lora_bias_sources(converter, sources):
    from server.adapters.conversion import ConversionRefused

    infos = [sources["lora-bias"][0], sources["lora"][0]]
    with pytest.raises(ConversionRefused, match="lora_bias"):
        converter.merge(infos, [1.0, 1.0], Combination("linear"), "nope", Target(rank=2), "default").result()


def test_full_finetune_with_planted_spectra(runtime, converter, hf, tmp_path):
    """W_ft = W0 + U diag(σ) Vᵀ on q,k,v,o (and a changed bias and norm): the reported errors are the
    planted spectra's, and PEFT, loading the result, gets the truncated update and the bias."""
    g = torch.Generator().manual_seed(9)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    planted = {}
    for i in range(2):
        for proj in QKVO:
            path = f"model.layers.{i}.self_attn.{proj}"
            w = state[path + ".weight"]
            k = min(w.shape)
            sigma = torch.tensor([2.0 * 0.7**j for j in range(k)], dtype=torch.float64)
            U = torch.linalg.qr(torch.randn(w.shape[0], k, dtype=torch.float64, generator=g)).Q
            V = torch.linalg.qr(torch.randn(w.shape[1], k, dtype=torch.float64, generator=g)).Q
            delta = (U * sigma @ V.T).float()
            state[path + ".weight"] = w + delta
            planted[path] = (w.double() + delta.double() - w.double(), sigma)
    state["model.layers.0.self_attn.q_proj.bias"] += 0.5  # a bias change travels as lora_bias
    state["model.norm.weight"] += 1.0  # not adaptable: ignored, and listed
    file = tmp_path / "ft.safetensors"
    save_file(state, file)
    result = converter.convert_full(file, QKVO, "from-full", Target(rank=5), "default").result()
    report = result.report
    assert report["source"]["kind"] == "full" and "model.norm.weight" in report["source"]["ignored_examples"]
    assert {layer["path"] for layer in report["layers"]} == set(planted)
    for layer in report["layers"]:
        # ΔW is the float32 difference of the two files: its spectrum is the planted one to ~1e-6
        delta, sigma = planted[layer["path"]]
        assert layer["rank"] == 5
        assert layer["sigma_next"] == pytest.approx(float(sigma[5]), rel=1e-4)
        assert layer["frobenius_error"] == pytest.approx(float(sigma[5:].norm()), rel=1e-4)
        assert layer["frobenius_error_rel"] == pytest.approx(float(sigma[5:].norm() / sigma.norm()), rel=1e-4)
    out = tmp_path / "out"
    out.mkdir()
    stored_files(runtime, result.info, out)
    converted = load_peft(hf, out)
    q = converted.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert torch.allclose(q.lora_B["default"].bias, torch.full((64,), 0.5), atol=1e-6)
    delta, sigma = planted["model.layers.0.self_attn.q_proj"]
    U, S, Vh = torch.linalg.svd(delta)
    best = U[:, :5] * S[:5] @ Vh[:5]
    assert (q.get_delta_weight("default").double() - best).abs().max() < 1e-5
    assert math.isfinite(report["logits"]["max_logit_diff"])
