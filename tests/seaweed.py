"""A real S3-compatible server for tests: SeaweedFS on loopback (server/scale/local_s3.py), with the
AWS variables that reach it set in this process for its lifetime (so in-process stores, server
processes and Ray workers started meanwhile find it the usual way)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.scale.local_s3 import BUCKET, LocalS3, local_s3

__all__ = ["BUCKET", "LocalS3", "seaweed_s3"]


@contextmanager
def seaweed_s3(data_dir: Path) -> Iterator[LocalS3]:
    with local_s3(data_dir) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
