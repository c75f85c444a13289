"""Local paths and ``s3://`` URIs behind one pyarrow ``FileSystem`` (DESIGN.md §9).

``resolve(uri, storage_cfg)`` is the single place where a URI becomes a filesystem and a path.
Everything else (prepare, splits, the Ray Data pipeline, checkpoints) goes through it, so S3
settings come from one :class:`~multimix.config.StorageConfig` (or the standard AWS environment
variables), and S3 failures become one :class:`StorageError` that names the URI and the likely
cause — never the keys. Buckets are never created implicitly: a missing bucket is an error.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from multimix.config import StorageConfig, _fill_storage_from_env
from multimix.errors import DataError, StorageError

__all__ = [
    "resolve",
    "is_s3",
    "join",
    "exists",
    "read_bytes",
    "write_bytes",
    "read_text",
    "write_text",
    "write_file",
    "list_files",
    "delete_dir",
    "check_writable",
    "storage_errors",
    "default_storage",
    "has_keys",
    "export_keys",
    "staged_output",
    "output_uri",
    "chain_storage",
]


def default_storage() -> StorageConfig:
    """A :class:`StorageConfig` with endpoint/region from ``AWS_*`` (keys: the default chain)."""
    st = StorageConfig()
    _fill_storage_from_env(st)
    return st


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` → ``("bucket", "bucket/a/b")``."""
    rest = uri[len("s3://"):]
    bucket = rest.split("/", 1)[0]
    rest = rest.strip("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name (expected s3://bucket/prefix)")
    rest = re.sub(r"/+", "/", rest)
    return bucket, rest


def _endpoint_parts(endpoint: str) -> tuple[str, str]:
    """``http://host:9000`` → ``("host:9000", "http")``; a bare ``host:port`` means https."""
    endpoint = endpoint.strip()
    if "://" in endpoint:
        u = urlparse(endpoint)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise StorageError(
                f"storage.endpoint {endpoint!r}: expected http://host:port or https://host"
            )
        return u.netloc + u.path.rstrip("/"), u.scheme
    return endpoint.rstrip("/"), "https"


def resolve(uri: str, storage_cfg: Optional[StorageConfig] = None) -> tuple[pafs.FileSystem, str]:
    """URI → ``(pyarrow FileSystem, path inside it)``.

    - ``/a/b``, ``a/b``, ``file:///a/b`` → ``LocalFileSystem``, absolute path.
    - ``s3://bucket/prefix`` → ``S3FileSystem`` with ``endpoint_override`` and scheme from
      ``storage.endpoint`` (``http://host:port``) and ``region``. Keys are passed only when the
      config sets them (local use); otherwise the filesystem holds none and pyarrow's AWS default
      chain (environment, ``~/.aws``, instance profile, IRSA web identity) resolves them in
      whichever process uses it — a pickled copy (Ray task, Train run state, ``tuner.pkl``)
      carries endpoint and region only, and expiring credentials refresh there. The path is
      ``bucket/prefix`` without a trailing slash.
    - ``s3:/bucket`` (a URI that lost a slash, e.g. through ``pathlib``) is an error, never a
      local folder of that name.

    Args:
        storage_cfg: S3 settings; None reads the ``AWS_*`` environment variables.

    Raises:
        StorageError: unsupported scheme or malformed URI / endpoint.
    """
    uri = os.fspath(uri)
    if not uri:
        raise StorageError("empty path/URI")
    _check_not_mangled(uri)
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(urlparse(uri).path)
    if is_s3(uri):
        _, path = _split_s3(uri)
        st = storage_cfg if storage_cfg is not None else default_storage()
        kwargs: dict = {
            "region": st.region or "us-east-1",
            "allow_bucket_creation": False,
            "allow_bucket_deletion": False,
            "connect_timeout": 5.0,
            "request_timeout": 60.0,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        }
        if st.endpoint:
            kwargs["endpoint_override"], kwargs["scheme"] = _endpoint_parts(st.endpoint)
        if st.access_key_id or st.secret_access_key:
            if not (st.access_key_id and st.secret_access_key):
                raise StorageError(
                    "storage.access_key_id and storage.secret_access_key must be set together "
                    "(or neither, to use the AWS default credential chain)"
                )
            kwargs["access_key"] = st.access_key_id
            kwargs["secret_key"] = st.secret_access_key
            if st.session_token:
                kwargs["session_token"] = st.session_token
        return pafs.S3FileSystem(**kwargs), path
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: unsupported scheme {scheme!r} (use a local path or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


_MANGLED = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):/(?!/)")


def absolute_uri(uri: str) -> str:
    """A local path made absolute (``os.path.abspath``); ``s3://`` and other URIs, and the
    empty string, unchanged. For values another process uses from another working directory
    (a Ray Train worker, a Tune trial)."""
    return os.path.abspath(uri) if uri and not is_s3(uri) and "://" not in uri else uri


def _check_not_mangled(uri: str) -> None:
    """``s3:/b/x`` or ``./s3:/b/x`` is a URI that lost a slash: refuse it as a local path."""
    for part in (uri, uri[2:] if uri.startswith("./") else uri):
        m = _MANGLED.match(part)
        if m:
            raise StorageError(f"{uri}: looks like a URI with a missing slash; write "
                               f"{m.group(1)}://{part[m.end():]} (or ./{m.group(1)}_... for a "
                               "local folder)")


def has_keys(st: Optional[StorageConfig]) -> bool:
    """Whether the config itself sets S3 keys (instead of the default credential chain)."""
    return bool(st is not None and (st.access_key_id or st.secret_access_key or st.session_token))


_KEY_ENV = (("access_key_id", "AWS_ACCESS_KEY_ID"),
            ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
            ("session_token", "AWS_SESSION_TOKEN"))


def export_keys(st: Optional[StorageConfig]) -> bool:
    """Put keys given in the config into this process's ``AWS_*`` environment variables.

    Called before a *local* Ray starts, so every Ray process inherits them and the keyless
    filesystems that Ray pickles (run state, Tune state) find them through the default chain —
    the keys are never written anywhere. Returns whether anything was exported.
    """
    if not has_keys(st):
        return False
    if not (st.access_key_id and st.secret_access_key):
        raise StorageError(
            "storage.access_key_id and storage.secret_access_key must be set together "
            "(or neither, to use the AWS default credential chain)"
        )
    for field_, var in _KEY_ENV:
        value = getattr(st, field_)
        if value:
            os.environ[var] = value
        else:
            os.environ.pop(var, None)
    return True


def chain_storage(st: Optional[StorageConfig]) -> StorageConfig:
    """The same endpoint/region without keys: for filesystems that Ray pickles and stores."""
    st = st if st is not None else default_storage()
    return StorageConfig(endpoint=st.endpoint, region=st.region)


@contextmanager
def staged_output(uri: str, storage_cfg: Optional[StorageConfig] = None) -> Iterator[Path]:
    """A local directory to write an output folder into; for ``s3://`` it is uploaded to ``uri``
    when the block ends without error (a local ``uri`` is used directly).

    Raises:
        StorageError: ``uri`` is not writable (missing bucket, bad keys, a file in the way).
    """
    check_writable(uri, storage_cfg)
    if not is_s3(uri):
        _, path = resolve(uri)
        os.makedirs(path, exist_ok=True)
        yield Path(path)
        return
    tmp = tempfile.mkdtemp(prefix="multimix-out-")
    try:
        yield Path(tmp)
        fs, path = resolve(uri, storage_cfg)
        with storage_errors(uri, storage_cfg):
            pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def output_uri(uri: str, local_dir: Path, local_path: "str | os.PathLike") -> str:
    """Where ``local_path`` (inside a :func:`staged_output` directory) ends up under ``uri``."""
    if not is_s3(uri):
        return str(local_path)
    return join(uri, Path(local_path).relative_to(local_dir).as_posix())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (``s3://b/p`` + ``data`` → ``s3://b/p/data``)."""
    uri = os.fspath(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/") or rest, *parts)
    return os.path.join(uri, *parts)


# ---------------------------------------------------------------------------------------------
# error translation


def _secrets(st: Optional[StorageConfig]) -> list[str]:
    st = st if st is not None else default_storage()
    vals = [st.access_key_id, st.secret_access_key, st.session_token]
    env = [os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    return [v for v in vals + env if v and len(v) >= 4]


def _scrub(msg: str, st: Optional[StorageConfig]) -> str:
    for s in _secrets(st):
        msg = msg.replace(s, "***")
    return msg


def _endpoint_name(st: Optional[StorageConfig]) -> str:
    st = st if st is not None else default_storage()
    return st.endpoint or "the default AWS endpoint"


_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "HTTP response code 403", "response code: 403", "Forbidden", "INVALID_ACCESS_KEY_ID",
           "SIGNATURE_DOES_NOT_MATCH", "error code: 15")
_NO_BUCKET = ("NoSuchBucket", "NO_SUCH_BUCKET", "bucket does not exist", "Bucket does not exist")
_UNREACHABLE = ("curlCode: 7", "Couldn't connect", "Could not connect", "Connection refused",
                "NETWORK_CONNECTION", "Failed to connect", "Could not resolve host",
                "curlCode: 6", "curlCode: 28", "Timeout was reached")


def translate(exc: BaseException, uri: str, st: Optional[StorageConfig]) -> Exception:
    """Turn a pyarrow/OS error about ``uri`` into a :class:`StorageError` or :class:`DataError`."""
    msg = _scrub(str(exc), st)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in msg:
        return StorageError(f"{uri}: no space left on device (disk full)")
    if is_s3(uri):
        bucket, _ = _split_s3(uri)
        if any(s in msg for s in _DENIED):
            return StorageError(
                f"access denied to {uri}: check the S3 credentials (storage.access_key_id / "
                "storage.secret_access_key or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and "
                f"the permissions on bucket '{bucket}'"
            )
        if any(s in msg for s in _NO_BUCKET):
            return StorageError(f"bucket '{bucket}' does not exist at {_endpoint_name(st)} "
                                f"(create it first; {uri})")
        if any(s in msg for s in _UNREACHABLE):
            return StorageError(f"cannot reach the S3 endpoint {_endpoint_name(st)} for {uri}: "
                                "check storage.endpoint / AWS_ENDPOINT_URL and the network")
        if isinstance(exc, FileNotFoundError):
            return DataError(f"{uri}: no such file")
        return StorageError(f"{uri}: {msg}")
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{uri}: no such file or directory")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: permission denied")
    return StorageError(f"{uri}: {msg}")


@contextmanager
def storage_errors(uri: str, st: Optional[StorageConfig] = None) -> Iterator[None]:
    """Context manager: pyarrow ``OSError``\\ s raised inside become clear user errors."""
    try:
        yield
    except (StorageError, DataError):
        raise
    except OSError as exc:
        raise translate(exc, uri, st) from None


# ---------------------------------------------------------------------------------------------
# small helpers


def check_bucket(uri: str, storage_cfg: Optional[StorageConfig] = None) -> None:
    """For ``s3://`` URIs: the bucket must exist and be reachable with these credentials.

    (Writes to a missing bucket do not always fail before the stream is closed, so writers call
    this up front.) No-op for local paths.

    Raises:
        StorageError: missing bucket, access denied or unreachable endpoint.
    """
    if not is_s3(uri):
        return
    bucket, _ = _split_s3(uri)
    fs, _ = resolve(uri, storage_cfg)
    with storage_errors(uri, storage_cfg):
        info = fs.get_file_info(bucket)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"bucket '{bucket}' does not exist at {_endpoint_name(storage_cfg)} "
                           f"(create it first; {uri})")


def check_writable(uri: str, storage_cfg: Optional[StorageConfig] = None) -> None:
    """Fail early when ``uri`` cannot be written: a missing bucket, bad credentials, or a local
    path whose nearest existing parent is a file."""
    if is_s3(uri):
        check_bucket(uri, storage_cfg)
        return
    _, path = resolve(uri)
    p = path
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    if os.path.exists(p) and not os.path.isdir(p):
        raise StorageError(f"{uri}: {p} is a file, not a directory")


def exists(uri: str, storage_cfg: Optional[StorageConfig] = None) -> bool:
    """Whether a file or directory exists at ``uri``."""
    fs, path = resolve(uri, storage_cfg)
    with storage_errors(uri, storage_cfg):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage_cfg: Optional[StorageConfig] = None) -> bytes:
    """The whole file. Raises DataError when it does not exist, StorageError on S3 trouble
    (including a missing bucket)."""
    fs, path = resolve(uri, storage_cfg)
    try:
        with storage_errors(uri, storage_cfg):
            with fs.open_input_stream(path) as f:
                return f.read()
    except DataError:
        check_bucket(uri, storage_cfg)  # a missing bucket says so, not "no such file"
        raise


def write_bytes(uri: str, data: bytes, storage_cfg: Optional[StorageConfig] = None) -> None:
    """Write (replace) a file atomically, creating local parent directories.

    Local: written to a temporary name beside it, flushed to disk, then renamed over ``uri``
    (``os.replace``), so a reader sees the old file or the whole new one — never a truncated
    file, even when the disk fills up or the process is killed mid-write. ``s3://``: one PUT of
    the whole object (S3 makes an object visible only when its upload completes); the bytes are
    all in memory before the upload starts, so a failure never completes a partial upload.
    The bucket must exist (checked first: some S3 servers, SeaweedFS among them, would silently
    create it on the first write).

    Raises:
        StorageError: disk full (``no space left on device``), permission denied, S3 trouble.
    """
    check_bucket(uri, storage_cfg)
    fs, path = resolve(uri, storage_cfg)
    write_file(fs, path, data, uri=uri, storage_cfg=storage_cfg)


def write_file(fs: pafs.FileSystem, path: str, data: "bytes | memoryview", *,
               uri: Optional[str] = None,
               storage_cfg: Optional[StorageConfig] = None) -> None:
    """:func:`write_bytes` for a ``(filesystem, path)`` pair (what Ray's storage context and
    :func:`resolve` give): atomic rename on a local filesystem, one whole upload elsewhere.
    ``uri`` names the file in errors (default: ``path``)."""
    name = uri or path
    with storage_errors(name, storage_cfg):
        if isinstance(fs, pafs.LocalFileSystem):
            _replace_local(path, data)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)


def _replace_local(path: str, data: "bytes | memoryview") -> None:
    """Write ``data`` to a temporary file in ``path``'s folder, fsync, rename over ``path``."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a plain file as open() would make it
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def replace_local(path: "str | os.PathLike", data: "bytes | str") -> None:
    """Write a local file atomically (temporary name, fsync, rename): for files written into a
    :func:`staged_output` folder or beside a run (results tables, plots, best configs).

    Raises:
        StorageError: disk full, permission denied.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    with storage_errors(str(path)):
        _replace_local(str(path), data)


# ---------------------------------------------------------------------------------------------
# conditional writes (the run directory's lease)


def _bucket_key(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → ``("bucket", "a/b")`` (boto3's names)."""
    bucket, path = _split_s3(uri)
    return bucket, path[len(bucket):].lstrip("/")


def _s3_client(st: Optional[StorageConfig]):
    """A boto3 S3 client for the same endpoint, region and keys as :func:`resolve` (keys only
    when the config has them; else boto3's default chain)."""
    import boto3

    st = st if st is not None else default_storage()
    kwargs: dict = {"region_name": st.region or "us-east-1"}
    if st.endpoint:
        kwargs["endpoint_url"] = st.endpoint
    if st.access_key_id and st.secret_access_key:
        kwargs.update(aws_access_key_id=st.access_key_id,
                      aws_secret_access_key=st.secret_access_key)
        if st.session_token:
            kwargs["aws_session_token"] = st.session_token
    return boto3.client("s3", **kwargs)


def _local_version(path: str) -> str:
    info = os.stat(path)
    return f"{info.st_ino}-{info.st_size}-{info.st_mtime_ns}"


@contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (processes of one machine)."""
    import fcntl

    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    fd = os.open(os.path.join(folder, f".{name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_versioned(uri: str, storage_cfg: Optional[StorageConfig] = None
                   ) -> Optional[tuple[bytes, str]]:
    """``(content, version)`` of a small file, or None when it does not exist. ``version`` (the
    S3 ETag; locally inode, size and mtime) is what :func:`write_if` compares against."""
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        client = _s3_client(storage_cfg)
        try:
            obj = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None
        except Exception as exc:  # noqa: BLE001 - botocore errors: one storage error line
            raise translate(OSError(str(exc)), uri, storage_cfg) from None
        return obj["Body"].read(), obj["ETag"]
    _, path = resolve(uri, storage_cfg)
    with storage_errors(uri, storage_cfg):
        try:
            with open(path, "rb") as f:
                data = f.read()
            return data, _local_version(path)
        except FileNotFoundError:
            return None


def write_if(uri: str, data: bytes, storage_cfg: Optional[StorageConfig] = None, *,
             version: Optional[str] = None) -> bool:
    """Write ``data`` to ``uri`` only if it does not exist (``version`` None) or is still the
    ``version`` read by :func:`read_versioned`; returns whether it was written.

    ``s3://``: one PutObject with ``If-None-Match: *`` / ``If-Match: <ETag>`` (S3 has honoured
    both since 2024; so does SeaweedFS 4.x): the server decides, so of two writers racing one
    wins. Locally: under an exclusive ``flock`` beside the file, then an atomic rename (one
    machine; on a shared network filesystem flock may not hold across machines).

    Raises:
        StorageError: disk full, permissions, S3 trouble.
    """
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        client = _s3_client(storage_cfg)
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, **cond)
        except client.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409,
                                                                                        412):
                return False
            if version is not None and code == "NoSuchKey":  # If-Match on a deleted object
                return False
            raise translate(OSError(str(exc)), uri, storage_cfg) from None
        except Exception as exc:  # noqa: BLE001 - connection errors: one storage error line
            raise translate(OSError(str(exc)), uri, storage_cfg) from None
        return True
    _, path = resolve(uri, storage_cfg)
    with storage_errors(uri, storage_cfg):
        with _local_lock(path):
            try:
                current = _local_version(path)
            except FileNotFoundError:
                current = None
            if current != version:
                return False
            _replace_local(path, data)
            return True


def remove_if(uri: str, storage_cfg: Optional[StorageConfig] = None, *,
              version: str) -> bool:
    """Delete ``uri`` if it is still ``version``; returns whether it was deleted (a file that
    is already gone counts as deleted). ``s3://``: read-compare-delete (a concurrent writer in
    between is possible but only shortens a lease that was being given up anyway)."""
    if is_s3(uri):
        got = read_versioned(uri, storage_cfg)
        if got is None:
            return True
        if got[1] != version:
            return False
        bucket, key = _bucket_key(uri)
        try:
            _s3_client(storage_cfg).delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise translate(OSError(str(exc)), uri, storage_cfg) from None
        return True
    _, path = resolve(uri, storage_cfg)
    with storage_errors(uri, storage_cfg):
        with _local_lock(path):
            try:
                if _local_version(path) != version:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                pass
            return True


def read_text(uri: str, storage_cfg: Optional[StorageConfig] = None) -> str:
    return read_bytes(uri, storage_cfg).decode("utf-8")


def write_text(uri: str, text: str, storage_cfg: Optional[StorageConfig] = None) -> None:
    write_bytes(uri, text.encode("utf-8"), storage_cfg)


def list_files(uri: str, storage_cfg: Optional[StorageConfig] = None,
               recursive: bool = True) -> list[str]:
    """Paths (relative to ``uri``, ``/``-separated, sorted) of the files under a directory."""
    fs, path = resolve(uri, storage_cfg)
    with storage_errors(uri, storage_cfg):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive,
                                                   allow_not_found=True))
    base = path.rstrip("/") + "/"
    out = []
    for info in infos:
        if info.type == pafs.FileType.File:
            p = info.path.replace(os.sep, "/") if os.sep != "/" else info.path
            out.append(p[len(base):] if p.startswith(base) else p)
    return sorted(out)


def delete_dir(uri: str, storage_cfg: Optional[StorageConfig] = None) -> None:
    """Delete a directory (prefix) and everything under it; no error when it does not exist."""
    fs, path = resolve(uri, storage_cfg)
    with storage_errors(uri, storage_cfg):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_dir(path)
