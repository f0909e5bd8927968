"""Inputs on S3: an `s3://bucket/key` in params is read from a local copy in a cache folder.

`data.train_path` and `data.eval_path` (one object each) and `model.base` (a prefix: every
object under it, a Hugging Face folder) may be S3 URIs. `local_path` is the one helper the
stages call: a local path comes back as it is, a URI comes back as its cached copy.

Endpoint, region and credentials come from the environment only, read by boto3 itself:
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (MinIO, moto, ...; unset for AWS), `AWS_DEFAULT_REGION`,
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, or a profile or role
(IRSA on EKS). Params never hold any of them.

Cache: `$TUNELINE_CACHE_DIR/s3/<bucket>/<key>` (default `~/.cache/tuneline`). A copy is used
again while the bucket's ETag and size of every object still match (one HEAD or LIST request);
otherwise the changed objects are downloaded again. Downloads land beside their target and
are renamed into place under a file lock: never a half-written file, even with several
processes (torchrun ranks) asking at once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tuneline.atomic import atomic_dir, write_json
from tuneline.errors import TunelineError

SCHEME = "s3://"
CACHE_ENV = "TUNELINE_CACHE_DIR"
MANIFEST = ".tuneline-s3.json"  # inside a cached prefix; beside a cached object as <name>.tuneline-s3.json


def is_remote(path: Path | str | None) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    if not is_remote(uri):
        raise TunelineError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len(SCHEME):].partition("/")
    if not bucket:
        raise TunelineError(f"{uri}: no bucket in the URI (expected s3://bucket/key)")
    return bucket, key


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tuneline").expanduser()


def cache_path(uri: str) -> Path:
    bucket, key = split_uri(uri)
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise TunelineError(f"{uri}: '.' and '..' are not allowed in a key")
    return cache_root() / "s3" / bucket / Path(*parts) if parts else cache_root() / "s3" / bucket


def local_path(path: Path | str | None) -> Path | None:
    """The local file or folder for a params path: itself, or the cached copy of an s3:// URI."""
    if path is None:
        return None
    return fetch(path) if is_remote(path) else Path(path)


def client():
    """An S3 client configured by the environment alone (boto3 reads AWS_ENDPOINT_URL[_S3] itself)."""
    import boto3

    return boto3.client("s3")


def _explain(uri: str, err: Exception) -> TunelineError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(err, NoCredentialsError):
        why = "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or role)"
    elif isinstance(err, EndpointConnectionError):
        why = f"cannot reach the S3 endpoint ({err}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL"
    elif isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        why = {"NoSuchBucket": "no such bucket", "AccessDenied": "access denied (check the credentials' policy)",
               "403": "access denied (check the credentials' policy)",
               "InvalidAccessKeyId": "the access key is not known to this endpoint"}.get(code, str(err))
    else:
        why = str(err)
    return TunelineError(f"{uri}: {why}")


def _read_manifest(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _download(s3, bucket: str, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.part-{os.getpid()}"
    try:
        s3.download_file(bucket, key, str(tmp))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _fetch_object(s3, uri: str, bucket: str, key: str, head: dict) -> Path:
    dest = cache_path(uri)
    manifest = dest.parent / (dest.name + MANIFEST)
    want = {key: [head["ETag"], head["ContentLength"]]}
    if not (dest.is_file() and _read_manifest(manifest) == want):
        _download(s3, bucket, key, dest)
        write_json(manifest, want)
    return dest


def _fetch_prefix(s3, uri: str, bucket: str, prefix: str) -> Path:
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # folder markers written by some tools
                objects[obj["Key"][len(prefix):]] = [obj["ETag"], obj["Size"]]
    if not objects:
        raise TunelineError(f"{uri}: no such object, and no objects under it (bucket {bucket!r})")
    dest = cache_path(uri)
    old = _read_manifest(dest / MANIFEST)
    if dest.is_dir() and old == objects:
        return dest
    with atomic_dir(dest) as tmp:  # unchanged files are linked from the old copy, the rest downloaded
        for rel, meta in objects.items():
            target = tmp / rel
            if old.get(rel) == meta and (dest / rel).is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(dest / rel, target)
                except OSError:
                    shutil.copy2(dest / rel, target)
            else:
                _download(s3, bucket, prefix + rel, target)
        write_json(tmp / MANIFEST, objects)
    return dest


def fetch(uri: str) -> Path:
    """Download `s3://bucket/key` (an object, or every object under the prefix `key/`) into the cache."""
    from botocore.exceptions import BotoCoreError, ClientError
    from filelock import FileLock

    bucket, key = split_uri(uri)
    dest = cache_path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        s3 = client()
        with FileLock(str(dest.parent / f".{dest.name}.lock")):
            head = None
            if key and not key.endswith("/"):
                try:
                    head = s3.head_object(Bucket=bucket, Key=key)
                except ClientError as e:
                    if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                        raise
            if head is not None:
                return _fetch_object(s3, uri, bucket, key, head)
            return _fetch_prefix(s3, uri, bucket, key.rstrip("/") + "/" if key else "")
    except (BotoCoreError, ClientError) as e:
        raise _explain(uri, e) from None
