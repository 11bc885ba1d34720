"""`python -m server`: parse the config, load the model, build the engine and app, run uvicorn.
`python -m server keys ...`: manage API keys (server/tenancy/cli.py)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from server.config import parse_args
from server.demo_model import DEMO_MODEL_DIR, is_complete_model_dir


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        from server.tenancy.cli import main as keys_main

        sys.exit(keys_main(argv[1:]))
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.model == DEMO_MODEL_DIR and not is_complete_model_dir(DEMO_MODEL_DIR):
        sys.exit(
            f"the demo model is not at {DEMO_MODEL_DIR}; run `make setup` "
            "(or python scripts/fetch_demo_model.py), or pass --model DIR"
        )
    from server.app import create_app
    from server.cpu_threads import one_core_for_torch
    from server.runtime import build_runtime

    runtime = build_runtime(config)
    one_core_for_torch()  # this thread now only serves HTTP; the engine thread has the cores
    # SIGTERM: uvicorn stops accepting, lets running requests finish for up to shutdown_timeout_s,
    # then the app's lifespan stops the engine and the upload worker (see create_app).
    uvicorn.run(
        create_app(runtime),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=config.shutdown_timeout_s,
    )


if __name__ == "__main__":
    main()
