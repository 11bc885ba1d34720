"""`python -m server`: parse the config, load the model, build the engine and app, run uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.config import parse_args
from server.demo_model import DEMO_MODEL_DIR, is_complete_model_dir


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.model == DEMO_MODEL_DIR and not is_complete_model_dir(DEMO_MODEL_DIR):
        sys.exit(
            f"the demo model is not at {DEMO_MODEL_DIR}; run `make setup` "
            "(or python scripts/fetch_demo_model.py), or pass --model DIR"
        )
    from server.app import create_app
    from server.runtime import build_runtime

    runtime = build_runtime(config)
    uvicorn.run(create_app(runtime), host=config.host, port=config.port, log_level=config.log_level)


if __name__ == "__main__":
    main()
