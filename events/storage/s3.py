"""S3-compatible object storage for data files (AWS S3, MinIO, R2, SeaweedFS), via aioboto3.

Files are built in a local staging directory, then uploaded: one PUT below the part
size, a multipart upload above it (aborted if any part fails). botocore retries each
request with backoff (``max_attempts``); a failure that survives the retries becomes
``Unavailable`` (HTTP 503), and the caller appends no event.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import anyio
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from events.errors import Unavailable
from events.storage.port import StoredObject

MIN_PART = 5 * 1024 * 1024
GLOB_CHARACTERS = "*?[]{}"  # S3's smallest allowed part (except the last)


@dataclass(frozen=True)
class S3Location:
    """Where and how to reach the bucket."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    path_style: bool = True
    create_bucket: bool = True
    part_size: int = 16 * 1024 * 1024
    max_attempts: int = 5

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3Location:
        """``s3://bucket/optional/prefix`` plus connection options."""
        if not url.startswith("s3://"):
            raise ValueError(f"an S3 storage URL starts with s3://, not {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        if not bucket:
            raise ValueError(f"no bucket in storage URL {url!r}")
        prefix = prefix.strip("/")
        if any(c in url for c in GLOB_CHARACTERS):
            # DuckDB reads file lists as glob patterns: these would match other paths.
            raise ValueError(f"the storage URL must not contain any of {GLOB_CHARACTERS}")
        return cls(bucket=bucket, prefix=f"{prefix}/" if prefix else "", **options)


def _unavailable(action: str, exc: Exception) -> Unavailable:
    return Unavailable(f"object storage failed to {action}: {exc}", code="storage_unavailable")


def _missing(exc: ClientError) -> bool:
    """Whether S3 said the object does not exist."""
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Storage:
    """The ``Storage`` port on an S3 bucket."""

    def __init__(self, location: S3Location, staging: Path) -> None:
        self.location = location
        self.staging = staging
        self.staging.mkdir(parents=True, exist_ok=True)
        self._session = aioboto3.Session()
        self._client: Any = None
        self._context: Any = None
        self._resolved: tuple[str, str, str | None] | None = None

    async def start(self) -> None:
        loc = self.location
        config = AioConfig(
            s3={"addressing_style": "path" if loc.path_style else "virtual"},
            retries={"max_attempts": loc.max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        self._context = self._session.client(
            "s3",
            endpoint_url=loc.endpoint_url,
            region_name=loc.region,
            aws_access_key_id=loc.access_key_id,
            aws_secret_access_key=loc.secret_access_key,
            aws_session_token=loc.session_token,
            config=config,
        )
        self._client = await self._context.__aenter__()
        if not loc.access_key_id:
            # No static keys: boto's credential chain (profile, web identity, instance
            # role...). DuckDB gets the keys it resolved to.
            creds = await self._session.get_credentials()
            if creds is not None:
                frozen = await creds.get_frozen_credentials()
                self._resolved = (frozen.access_key, frozen.secret_key, frozen.token)
        if loc.create_bucket:
            await self._ensure_bucket()

    async def close(self) -> None:
        if self._context is not None:
            await self._context.__aexit__(None, None, None)
            self._context = self._client = None

    async def _ensure_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.location.bucket)
            return
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise _unavailable(f"reach bucket {self.location.bucket!r}", exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(f"reach bucket {self.location.bucket!r}", exc) from exc
        try:
            await self._client.create_bucket(Bucket=self.location.bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _unavailable(f"create bucket {self.location.bucket!r}", exc) from exc

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid storage key {key!r}")
        return f"{self.location.prefix}{key}"

    def staging_file(self, suffix: str = "") -> Path:
        return self.staging / f"{uuid.uuid4().hex}{suffix}"

    async def publish(self, staged: Path, key: str) -> int:
        size = (await anyio.Path(staged).stat()).st_size
        target = self._key(key)
        try:
            if size <= self.location.part_size:
                body = await anyio.Path(staged).read_bytes()
                await self._client.put_object(Bucket=self.location.bucket, Key=target, Body=body)
            else:
                await self._multipart(staged, target)
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable(f"store {key}", exc) from exc
        return size

    async def _multipart(self, staged: Path, target: str) -> None:
        bucket = self.location.bucket
        part_size = max(self.location.part_size, MIN_PART)
        upload = await self._client.create_multipart_upload(Bucket=bucket, Key=target)
        upload_id = upload["UploadId"]
        parts = []
        try:
            async with await anyio.open_file(staged, "rb") as fh:
                number = 1
                while chunk := await fh.read(part_size):
                    done = await self._client.upload_part(
                        Bucket=bucket, Key=target, UploadId=upload_id, PartNumber=number, Body=chunk
                    )
                    parts.append({"PartNumber": number, "ETag": done["ETag"]})
                    number += 1
            await self._client.complete_multipart_upload(
                Bucket=bucket, Key=target, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                # Nothing half-written may stay behind; if even the abort fails, a bucket
                # lifecycle rule for incomplete uploads cleans up.
                with contextlib.suppress(BotoCoreError, ClientError):
                    await self._client.abort_multipart_upload(
                        Bucket=bucket, Key=target, UploadId=upload_id
                    )
            raise

    async def delete(self, key: str) -> None:
        try:
            await self._client.delete_object(Bucket=self.location.bucket, Key=self._key(key))
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable(f"delete {key}", exc) from exc

    async def exists(self, key: str) -> bool:
        try:
            await self._client.head_object(Bucket=self.location.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _missing(exc):
                return False
            raise _unavailable(f"check {key}", exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(f"check {key}", exc) from exc

    async def read(self, key: str) -> bytes | None:
        try:
            response = await self._client.get_object(
                Bucket=self.location.bucket, Key=self._key(key)
            )
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data
        except ClientError as exc:
            if _missing(exc):
                return None
            raise _unavailable(f"read {key}", exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(f"read {key}", exc) from exc

    async def list_objects(self, prefix: str = "") -> AsyncIterator[StoredObject]:
        """Every object under ``prefix`` (relative to the storage root)."""
        paginator = self._client.get_paginator("list_objects_v2")
        full = self._key(prefix) if prefix else self.location.prefix
        cut = len(self.location.prefix)
        try:
            async for page in paginator.paginate(Bucket=self.location.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield StoredObject(obj["Key"][cut:], obj["Size"], obj["LastModified"])
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable(f"list {prefix or 'objects'}", exc) from exc

    def engine_path(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{self._key(key)}"

    def engine_secret(self) -> dict[str, str] | None:
        """What DuckDB's S3 secret needs, scoped to this bucket and prefix."""
        loc = self.location
        key, secret_key, token = loc.access_key_id, loc.secret_access_key, loc.session_token
        if not key and self._resolved is not None:
            key, secret_key, token = self._resolved
        secret = {
            "KEY_ID": key or "",
            "SECRET": secret_key or "",
            "REGION": loc.region,
            "URL_STYLE": "path" if loc.path_style else "vhost",
            "SCOPE": f"s3://{loc.bucket}/{loc.prefix}",
        }
        if token:
            secret["SESSION_TOKEN"] = token
        if loc.endpoint_url:
            scheme, _, host = loc.endpoint_url.partition("://")
            secret["ENDPOINT"] = host.rstrip("/")
            secret["USE_SSL"] = "true" if scheme == "https" else "false"
        return secret
