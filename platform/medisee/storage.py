"""The one place that turns a URI into a pyarrow filesystem or a boto3 client.

URIs: `/local/path`, `relative/path`, `file:///abs/path`, `s3://bucket/prefix`.
Settings come from config (endpoint, region); credentials only from the environment
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN), never from config files.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV_VARS = ("MEDISEE_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
COPY_CHUNK_BYTES = 16 * 1024 * 1024


class UnsafeKey(ValueError):
    """An object whose key, made a local path, would land outside the folder it is downloaded into."""


@dataclass(frozen=True)
class StorageSettings:
    endpoint: str | None = None
    region: str = "us-east-1"

    @classmethod
    def resolve(cls, endpoint: str | None = None, region: str | None = None) -> StorageSettings:
        """Explicit values win; otherwise the endpoint comes from the environment."""
        if endpoint is None:
            endpoint = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
        region = region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        return cls(endpoint=endpoint, region=region)

    @classmethod
    def from_config(cls, storage_cfg) -> StorageSettings:
        return cls.resolve(storage_cfg.endpoint, storage_cfg.region)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri) or str(uri).startswith("file://"):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(Path(uri, *parts))


def filesystem(uri: str, settings: StorageSettings | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for `uri`."""
    settings = settings or StorageSettings.resolve()
    uri = str(uri)
    if is_s3(uri):
        parsed = urlparse(uri)
        kwargs = {"region": settings.region}
        if settings.endpoint:
            endpoint = urlparse(settings.endpoint)
            kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
            kwargs["scheme"] = endpoint.scheme or "https"
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def boto3_client(settings: StorageSettings | None = None):
    import boto3

    settings = settings or StorageSettings.resolve()
    return boto3.client("s3", endpoint_url=settings.endpoint, region_name=settings.region)


# Every stream opens with compression=None: bytes as stored. pyarrow's default inflates (and, writing,
# deflates) any name ending .gz, .bz2, .zst, ... on its own: unbounded on read, and a .nii.gz written
# to S3 would be gzipped twice.


def read_bytes(uri: str, settings: StorageSettings | None = None) -> bytes:
    fs, path = filesystem(uri, settings)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def read_text(uri: str, settings: StorageSettings | None = None) -> str:
    return read_bytes(uri, settings).decode("utf-8")


def write_bytes(uri: str, data: bytes, settings: StorageSettings | None = None) -> None:
    """Write atomically: readers never see a half-written object.

    S3 PUTs are atomic already; on a local filesystem write a temporary file and rename.
    """
    fs, path = filesystem(uri, settings)
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp, compression=None) as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path, compression=None) as f:
            f.write(data)


def exists(uri: str, settings: StorageSettings | None = None) -> bool:
    fs, path = filesystem(uri, settings)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(
    uri: str, suffixes: tuple[str, ...] = (), settings: StorageSettings | None = None
) -> list[str]:
    """Files under `uri` (recursive), as URIs of the same scheme, sorted."""
    fs, path = filesystem(uri, settings)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if suffixes and not info.path.lower().endswith(suffixes):
            continue
        rel = posixpath.relpath(info.path, path)
        out.append(join(str(uri), rel))
    return sorted(out)


def relative_names(uri: str, settings: StorageSettings | None = None) -> list[str]:
    """The files under `uri` as their keys after the prefix, exactly as stored (not normalised)."""
    fs, path = filesystem(uri, settings)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    root = path.rstrip("/") + "/"
    names = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if not info.path.startswith(root):
            raise UnsafeKey(f"{info.path!r} was listed under {uri} but does not start with it")
        names.append(info.path[len(root) :])
    return sorted(names)


def local_path_inside(folder: Path, name: str) -> Path:
    """`folder/name` for an object key relative to a prefix; refuses one that would leave `folder`:
    absolute, `..` or `.` segments, empty segments (`a//b`), or a path through a symlink out of it."""
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafeKey(f"object key {name!r} is not a plain relative path (it could land outside {folder})")
    target = folder.joinpath(*parts)
    if not target.resolve().is_relative_to(folder.resolve()):
        raise UnsafeKey(f"object key {name!r} would be written outside {folder}: refused")
    return target


def copy_to_local(uri: str, target: Path, settings: StorageSettings | None = None) -> None:
    """Stream one object to a local file (never whole in memory: model shards are gigabytes)."""
    fs, path = filesystem(uri, settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path, compression=None) as src, open(target, "wb") as dst:
        while chunk := src.read(COPY_CHUNK_BYTES):
            dst.write(chunk)


def download_dir(uri: str, folder: str | Path, settings: StorageSettings | None = None) -> int:
    """Copy every file under `uri` into the local `folder`, keeping relative paths; returns the count.

    Every key is checked before anything is written: one that would leave `folder` refuses the whole
    download (UnsafeKey).
    """
    folder = Path(folder)
    targets = [(name, local_path_inside(folder, name)) for name in relative_names(uri, settings)]
    for name, target in targets:
        copy_to_local(join(uri, name), target, settings)
    return len(targets)


def delete(uri: str, settings: StorageSettings | None = None) -> None:
    fs, path = filesystem(uri, settings)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | Path, uri: str, settings: StorageSettings | None = None) -> int:
    """Copy every file under a local directory to `uri`, keeping relative paths; returns the count."""
    count = 0
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            write_bytes(join(uri, path.relative_to(local_dir).as_posix()), path.read_bytes(), settings)
            count += 1
    return count


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_of(uri: str, settings: StorageSettings | None = None) -> str:
    """The sha256 of a file or object, read in chunks."""
    fs, path = filesystem(uri, settings)
    digest = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as f:
        while chunk := f.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
