"""How the mirror libraries (pyiceberg, deltalake, pyarrow) reach the storage: the
same root and credentials as the ``Storage`` the service writes through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from events.storage.port import Storage


@dataclass(frozen=True)
class Access:
    """``uri(key)``: the location readers and mirror metadata use for a storage key
    (an absolute local path, or ``s3://bucket/prefix/key``)."""

    storage: Storage
    s3: dict[str, str] | None = None
    iceberg_props: dict[str, str] = field(default_factory=dict)
    delta_options: dict[str, str] = field(default_factory=dict)

    def uri(self, key: str) -> str:
        return self.storage.engine_path(key)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem, and the prefix turning a key into its path there."""
        if self.s3 is None:
            return pafs.LocalFileSystem(), self.uri("x")[:-1]
        s3 = self.s3
        fs = pafs.S3FileSystem(
            access_key=s3.get("KEY_ID") or None,
            secret_key=s3.get("SECRET") or None,
            session_token=s3.get("SESSION_TOKEN") or None,
            region=s3.get("REGION") or "us-east-1",
            endpoint_override=s3.get("ENDPOINT") or None,
            scheme="https" if s3.get("USE_SSL", "true") == "true" else "http",
            force_virtual_addressing=s3.get("URL_STYLE") == "vhost",
        )
        return fs, self.uri("x")[len("s3://") : -1]

    def client_config(self) -> dict[str, str]:
        """Storage settings an Iceberg REST client needs to read the files (sent with
        a loaded table: the credentials the service itself uses)."""
        config = dict(self.iceberg_props)
        if self.s3 is not None:
            config["s3.path-style-access"] = str(self.s3.get("URL_STYLE") != "vhost").lower()
            config["client.region"] = config["s3.region"]
        return config

    def read(self, uri: str) -> bytes:
        """The bytes of the object at ``uri`` (a ``uri(key)`` value)."""
        fs, _root = self.filesystem()
        path = uri[len("s3://") :] if uri.startswith("s3://") else uri
        with fs.open_input_stream(path) as stream:
            data: bytes = stream.read()
        return data


def access_for(storage: Storage) -> Access:
    secret = storage.engine_secret()
    if secret is None:
        return Access(storage)
    endpoint = secret.get("ENDPOINT")
    scheme = "https" if secret.get("USE_SSL", "true") == "true" else "http"
    url = f"{scheme}://{endpoint}" if endpoint else None
    iceberg: dict[str, Any] = {
        "s3.region": secret.get("REGION", "us-east-1"),
        "s3.force-virtual-addressing": str(secret.get("URL_STYLE") == "vhost").lower(),
    }
    delta: dict[str, Any] = {
        "AWS_REGION": secret.get("REGION", "us-east-1"),
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": str(secret.get("URL_STYLE") == "vhost").lower(),
        # One writer per table at a time (the runner's lease), so a plain PUT of the
        # next log entry is safe without a locking provider.
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    }
    if url:
        iceberg["s3.endpoint"] = url
        delta["AWS_ENDPOINT_URL"] = url
        if scheme == "http":
            delta["AWS_ALLOW_HTTP"] = "true"
    if secret.get("KEY_ID"):
        iceberg["s3.access-key-id"] = secret["KEY_ID"]
        iceberg["s3.secret-access-key"] = secret["SECRET"]
        delta["AWS_ACCESS_KEY_ID"] = secret["KEY_ID"]
        delta["AWS_SECRET_ACCESS_KEY"] = secret["SECRET"]
    if secret.get("SESSION_TOKEN"):
        iceberg["s3.session-token"] = secret["SESSION_TOKEN"]
        delta["AWS_SESSION_TOKEN"] = secret["SESSION_TOKEN"]
    return Access(storage, dict(secret), iceberg, delta)
