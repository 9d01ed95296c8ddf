"""fsspec access to dataset roots: open, list, join and atomically write files at any URL.

Every data file tokfleet writes (shards, sidecars, manifests, tokenizer files) goes through
`write_bytes_atomic`, so a reader never sees a half-written file under its final name: the
bytes land in `name.tmp-<uuid>` first and are then renamed (`os.replace` after fsync on a local
disk; upload then `mv` on object stores, where the upload itself is already all-or-nothing).
A plain path is a local file; `s3://...`, `memory://...` or any fsspec URL works the same way.
Credentials come from `storage_options` (s3fs: key, secret, client_kwargs.endpoint_url) or the
usual AWS environment/config (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
~/.aws). An object store refusing the credentials, or a missing bucket, is the user's input at
fault: `UserError` with one line naming the URL (s3fs says only "Forbidden" or "None").
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, BinaryIO, Iterator, TextIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.errors import UserError

TMP_MARKER = ".tmp-"
OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}  # no folders: nothing to makedirs

# botocore logs "Found credentials in environment variables." at INFO: noise beside a one-line error
for _name in ("botocore", "aiobotocore"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


def _service_code(error: BaseException) -> str | None:
    """The object store's error code (e.g. NoSuchBucket, SignatureDoesNotMatch) behind an fsspec error."""
    while error is not None:
        response = getattr(error, "response", None)  # botocore's ClientError
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return response["Error"]["Code"]
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def _remote_errors(url: str) -> Iterator[None]:
    """Refused credentials and missing buckets -> UserError; other errors (a missing file) unchanged."""
    try:
        yield
    except PermissionError as error:
        if is_local(url):
            raise
        code = _service_code(error) or "Forbidden"
        raise UserError(f"{url}: access denied by the object store ({code}): check the credentials (storage_options "
                        "key/secret, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / ~/.aws) and the endpoint") from None
    except FileNotFoundError as error:
        if _service_code(error) == "NoSuchBucket":
            raise _no_such_bucket(url) from None
        raise


def _no_such_bucket(url: str) -> UserError:
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    return UserError(f"{url}: bucket {bucket!r} does not exist (create it first; tokfleet never creates buckets)")


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & OBJECT_STORE_PROTOCOLS)


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *names: str) -> str:
    """`url`/`name`/...; keeps the URL's scheme and never uses the OS separator for remote URLs."""
    if is_local(url):
        return os.path.join(url, *names)
    return "/".join([url.rstrip("/"), *(name.strip("/") for name in names)])


def open_url(url: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> BinaryIO | TextIO:
    """Open `url` for reading or (non-atomic) writing; use as a context manager."""
    return fsspec.open(url, mode, **(storage_options or {})).open()


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    with _remote_errors(url):
        return fs.exists(path)


def size(url: str, storage_options: dict[str, Any] | None = None) -> int | None:
    """Size in bytes, or None when `url` does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        with _remote_errors(url):
            return int(fs.size(path))
    except FileNotFoundError:
        return None


def ls(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names (not paths) of the entries of folder `url`, sorted; [] when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        with _remote_errors(url):
            entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(os.path.basename(entry.rstrip("/")) for entry in entries)


def glob(pattern: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(URL, fsspec info) of every file matching the remote glob `pattern` (e.g. s3://bucket/meg/*.fif)."""
    fs, path = filesystem(pattern, storage_options)
    with _remote_errors(pattern):
        found = fs.glob(path, detail=True)
        # s3fs's glob finds nothing in a missing bucket rather than failing: say which it is
        if not found and _is_object_store(fs) and not fs.exists(path.split("/", 1)[0]):
            raise _no_such_bucket(pattern)
    return [(fs.unstrip_protocol(name), info) for name, info in sorted(found.items()) if info.get("type") == "file"]


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    if is_local(url):
        with open(local_path(url), "rb") as handle:
            return handle.read()
    fs, path = filesystem(url, storage_options)
    return retrying(url, "reading", lambda: fs.cat_file(path))  # shards, manifests: a restarting store is waited for


def read_text(url: str, storage_options: dict[str, Any] | None = None) -> str:
    return read_bytes(url, storage_options).decode("utf-8")


@contextlib.contextmanager
def local_file(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local path holding `url`'s bytes, for libraries that only open paths (mne, FFmpeg).

    A local `url` is its own path; a remote one is downloaded into a temporary folder under its
    own file name (readers pick the format by extension) and deleted afterwards.
    """
    if is_local(url):
        yield local_path(url)
        return
    with tempfile.TemporaryDirectory(prefix="tokfleet-") as directory:
        path = os.path.join(directory, os.path.basename(url.rstrip("/")) or "input")
        with _remote_errors(url), open_url(url, "rb", storage_options) as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target, 4 << 20)
        yield path


def sha256_of(url: str, storage_options: dict[str, Any] | None = None, chunk_bytes: int = 4 << 20) -> str:
    digest = hashlib.sha256()
    with _remote_errors(url), open_url(url, "rb", storage_options) as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete file `url` if it exists."""
    fs, path = filesystem(url, storage_options)
    try:
        with _remote_errors(url):
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write `data` to `url` so that `url` holds either its old content or all of `data`."""
    fs, path = filesystem(url, storage_options)
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex}"
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as error:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(error, OSError) and not error.filename:  # a full disk names no file: name it
                raise OSError(error.errno, error.strerror, path) from None
            raise
        _fsync_dir(directory)
        return
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not _is_object_store(fs):  # s3fs makedirs would create a missing bucket
        fs.makedirs(parent, exist_ok=True)
    try:
        with _remote_errors(url):
            fs.pipe_file(tmp, data)
            fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm_file(tmp)
        except (FileNotFoundError, OSError):
            pass
        raise


def write_text_atomic(url: str, text: str, storage_options: dict[str, Any] | None = None) -> None:
    write_bytes_atomic(url, text.encode("utf-8"), storage_options)


def move_aside(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Move the folder (prefix) at `url` to the first free `URL.old-N` next to it; returns the new URL."""
    fs, path = filesystem(url, storage_options)
    base = url.rstrip("/")
    for number in range(1, 10_000):
        target_url = f"{base}.old-{number}"
        target = filesystem(target_url, storage_options)[1]
        if not fs.exists(target):
            with _remote_errors(url):
                fs.mv(path.rstrip("/"), target, recursive=True)
            return target_url
    raise UserError(f"{url}: 9999 older copies sit next to it already; remove some")


# ------------------------------------------------------------------ transient object-store errors

RETRY_BUDGET_S = 120.0  # how long an object store may fail transiently before an operation gives up
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "503", "500", "502", "504"}
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "HTTPClientError", "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
                    "ClientOSError", "ClientPayloadError", "IncompleteRead", "FSTimeoutError", "ResponseParserError"}

log = logging.getLogger("tokfleet.storage")


def is_transient(error: BaseException) -> bool:
    """An error that a later try may not meet: a refused or reset connection, a timeout, a 5xx answer
    or SlowDown. Walks the cause chain, since s3fs re-raises botocore's and aiohttp's errors as OSError."""
    while error is not None:
        if isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(error).__mro__):
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return status >= 500 or response.get("Error", {}).get("Code") in _TRANSIENT_CODES
        error = error.__cause__ or error.__context__
    return False


def retrying(url: str, what: str, operation, budget_s: float | None = None):
    """`operation()`, tried again with exponential backoff (0.5 s doubling to 8 s) while it fails with a
    transient error, for at most `budget_s` seconds (RETRY_BUDGET_S); each retry is one warning line.
    A permanent error, or a transient one past the budget, is a UserError naming `url` and `what`
    (refused credentials and missing buckets keep their own messages; a missing file stays a
    FileNotFoundError)."""
    budget_s = RETRY_BUDGET_S if budget_s is None else budget_s
    deadline = time.monotonic() + budget_s
    for attempt in itertools.count(1):
        try:
            with _remote_errors(url):
                return operation()
        except (UserError, FileNotFoundError):  # a missing file is the caller's to handle
            raise
        except Exception as error:  # noqa: BLE001 - sorted into transient and permanent below
            first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
            if not is_transient(error):
                raise UserError(f"{url}: {what} failed: {type(error).__name__}: {first_line}") from None
            wait = min(8.0, 0.5 * 2 ** (attempt - 1))
            if time.monotonic() + wait > deadline:
                raise UserError(f"{url}: {what} failed: the object store kept failing for {budget_s:.0f} s "
                                f"({attempt} tries; last: {type(error).__name__}: {first_line})") from None
            log.warning("%s: %s failed transiently (%s: %s); retry %d in %.1f s", url, what, type(error).__name__,
                        first_line, attempt, wait)
            time.sleep(wait)
