"""A real S3-compatible server (moto in server mode) on 127.0.0.1, for object-store run directories.

Import the fixture where needed (not in conftest.py, so only those tests pay for it)::

    from tests.s3_server import s3_server  # noqa: F401

It yields ``S3Endpoint``: ``uri(bucket, path)`` gives a pyarrow URI that carries the endpoint and
(fake) credentials as query parameters, so every process that opens it (the CLI, Ray workers)
reaches the same server without any environment set-up. The server speaks the S3 REST API over
HTTP; no cloud is involved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.mlflow_server import free_port


@dataclass(frozen=True)
class S3Endpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def uri(self, bucket: str, path: str = "") -> str:
        query = f"endpoint_override={self.host}:{self.port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
        where = f"{bucket}/{path.strip('/')}" if path else bucket
        return f"s3://testing:testing@{where}?{query}"  # moto accepts any credentials

    def create_bucket(self, bucket: str) -> None:
        import pyarrow.fs as pafs

        fs, _ = pafs.FileSystem.from_uri(self.uri(bucket))
        fs.create_dir(bucket)

    def list(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``bucket/prefix``."""
        import pyarrow.fs as pafs

        fs, _ = pafs.FileSystem.from_uri(self.uri(bucket))
        base = f"{bucket}/{prefix.strip('/')}".rstrip("/")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path[len(bucket) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = S3Endpoint("127.0.0.1", port)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint.url, timeout=2).read()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto S3 server did not start") from None
            time.sleep(0.3)
    try:
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
