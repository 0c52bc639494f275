"""Where adapters, checkpoints and event logs live: a local directory or an object store.

A location is a string: a filesystem path, or a URI that `pyarrow.fs.FileSystem.from_uri` resolves
(`s3://bucket/prefix`, `gs://...`), which is how Ray Train resolves its own `storage_path`, so one
`LORAFLEET_STORAGE` serves both. Credentials and endpoint come from the store's standard environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server, or the
node's IAM role), on every process that reads or writes: the server and each Ray node.

Object stores have no rename and no append. So a directory is published file by file with a marker
file written last (`publish`): readers treat a directory without its marker as absent, which gives the
same all-or-nothing view that an atomic rename gives on a filesystem. Readers that need real files
(safetensors, PEFT, transformers) work on a local copy (`local_copy`); local locations are used in place.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

"""A path or an object-store URI, as a string (pydantic fields accept `Path` objects too)."""


class StorageError(RuntimeError):
    """Storage cannot be used: named, with the cause and what to set."""


FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READ_ONLY_ERRNOS = frozenset({errno.EROFS})


def storage_fault(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or one it was raised from) when storage refuses writes: full,
    over quota, a file over its size limit, or read-only. These are the operator's to fix, not bugs, so
    callers answer them with `describe_fault` (first, in one line) instead of a traceback."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS | READ_ONLY_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def describe_fault(fault: OSError) -> str:
    """One line: what storage refused, where, and what to do."""
    name = errno.errorcode.get(fault.errno or 0, str(fault.errno))
    target = fault.filename2 or fault.filename  # a copy's destination is the one refused
    where = f" at {target}" if target else ""
    if fault.errno in READ_ONLY_ERRNOS:
        return f"storage is read-only ({name}){where}: remount it read-write, then retry"
    return f"storage is full ({name}: {fault.strerror}){where}: free space or grow the volume, then retry"


def check_writable(location: str | os.PathLike[str], setting: str = "LORAFLEET_STORAGE") -> None:
    """Write and delete a probe under `location`, so a server with a wrong bucket, endpoint or key fails
    at start with the reason, not hours later in the first checkpoint of a pack."""
    probe = join(location, f".lorafleet-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"ok")
        if read_bytes(probe) != b"ok":
            raise OSError("what was written did not read back")
        fs, path = resolve(probe)
        fs.delete_file(path)
    except (OSError, ValueError) as exc:  # pyarrow raises OSError subclasses for S3 errors
        hint = (
            "check the bucket exists and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL "
            "for an S3-compatible server) are set for this process and every Ray node"
            if is_remote(location)
            else "give a directory this user can write, mounted at the same path on every Ray node"
        )
        raise StorageError(f"{setting}={os.fspath(location)!r} is not writable: {exc}; {hint}") from exc


def is_remote(location: str | os.PathLike[str]) -> bool:
    scheme, sep, _ = os.fspath(location).partition("://")
    return bool(sep) and scheme != "file"


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """`location/part/...` for a path or a URI (object keys always use '/')."""
    text = os.fspath(location)
    if not is_remote(text):
        return str(Path(text).joinpath(*parts))
    return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])


def name(location: str | os.PathLike[str]) -> str:
    return os.fspath(location).rstrip("/").rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=16)
def _filesystem(root: str) -> pafs.FileSystem:
    """One client per bucket and process (creating an S3 client is far costlier than a request)."""
    return pafs.FileSystem.from_uri(root)[0]


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path on it (for Ray Train's `storage_filesystem` and for us)."""
    text = os.fspath(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())
    scheme, _, rest = text.partition("://")
    bucket = rest.split("/", 1)[0]
    return _filesystem(f"{scheme}://{bucket}"), rest.rstrip("/")


def exists(location: str | os.PathLike[str]) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike[str]) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def modified_ns(location: str | os.PathLike[str]) -> int | None:
    """When a file was last written (an object's upload time), None when it is not there."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    return info.mtime_ns if info.type == pafs.FileType.File else None


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """One whole object (a local file is written to a temporary sibling and renamed into place)."""
    if is_remote(location):
        fs, path = resolve(location)
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    target = Path(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def files(location: str | os.PathLike[str]) -> list[str]:
    """Relative paths of every file under a directory, sorted ([] when there is none)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(info.path[len(path) :].lstrip("/") for info in found if info.type == pafs.FileType.File)


def remove(location: str | os.PathLike[str]) -> None:
    """Delete a directory and everything under it; a missing one is fine."""
    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def publish(source: Path, dest: str | os.PathLike[str], marker: str) -> None:
    """Make the complete directory `source` appear at `dest`, replacing what was there; consumes `source`.

    On a filesystem it is renamed into place (atomic; `source` must be on the same filesystem). On an
    object store the old `dest` is deleted, then every file is uploaded with `marker` last, so a reader
    that requires the marker never sees a mix or a half."""
    if not is_remote(dest):
        target = Path(dest)
        if target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
            os.replace(source, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, target)
        return
    remove(dest)
    fs, path = resolve(dest)
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    for relative in sorted(names, key=lambda n: n == marker):  # the marker goes last
        with fs.open_output_stream(f"{path}/{relative}") as stream:
            stream.write((source / relative).read_bytes())
    shutil.rmtree(source, ignore_errors=True)


def staging_dir(dest: str | os.PathLike[str]) -> Path:
    """A fresh empty directory to build `dest` in before `publish`: beside it on a filesystem (so the
    rename is atomic), in the system's temp dir for an object store."""
    if is_remote(dest):
        return Path(tempfile.mkdtemp(prefix="lorafleet-stage-"))
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))


def download(location: str | os.PathLike[str], dest: Path) -> Path:
    """Copy every file of a directory to the local directory `dest` (created)."""
    fs, path = resolve(location)
    dest.mkdir(parents=True, exist_ok=True)
    for relative in files(location):
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{path}/{relative}") as stream:
            (dest / relative).write_bytes(stream.read())
    return dest


@contextmanager
def local_copy(location: str | os.PathLike[str]) -> Iterator[Path]:
    """The directory as local files for the duration of the block: in place when local, else a
    temporary download removed afterwards."""
    if not is_remote(location):
        yield Path(location)
        return
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-copy-"))
    try:
        yield download(location, tmp / name(location))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
