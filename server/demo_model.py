"""Where the demo model lives: a cache directory outside the repo, shared by setup, serve and tests."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_HOME = Path(os.environ.get("ADAPTER_SERVER_HOME", Path.home() / ".cache" / "adapter-server"))
DEMO_MODEL_DIR = CACHE_HOME / "models" / "SmolLM2-135M-Instruct"
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def is_complete_model_dir(path: Path) -> bool:
    """A converted directory is published atomically, so the files being there means it is complete."""
    return all((path / name).exists() for name in REQUIRED_FILES) and any(path.glob("*.safetensors"))
