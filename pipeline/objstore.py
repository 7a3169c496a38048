"""Object storage (`s3://bucket/key`, `gs://bucket/key`): the one module that talks to it, through
fsspec, with s3fs and gcsfs as optional extras imported when a URL first needs one.

Credentials come only from the standard chain that botocore and google-auth resolve (environment,
config files, instance role); an S3-compatible endpoint from `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`). Nothing here logs or stores a credential: messages name the URL and the
error, with any `user:password@` taken out, and no filesystem option carries a secret.

Transient failures (a connection dropped mid-transfer, a timeout, a 5xx, throttling) are retried
with exponential backoff, on top of the retries s3fs and botocore make themselves; a read that
returns fewer bytes than asked is retried too. A missing object fails at once with
`ObjectNotFound`, which names its URL. A PUT is atomic for readers: they see the old object or the
whole new one, never a part (a multipart upload appears only once it completes).

File systems are per process (fsspec drops its instance cache and its event loop in a forked
child), so the functions here are safe in loader workers, forked or started from a forkserver.
"""
from __future__ import annotations

import errno
import functools
import importlib
import inspect
import logging
import os
import re
import time

log = logging.getLogger(__name__)

# URL scheme -> (the fsspec implementation's package, its pip name)
SCHEMES = {"s3": ("s3fs", "s3fs"), "gs": ("gcsfs", "gcsfs"), "gcs": ("gcsfs", "gcsfs")}

RETRIES = 5          # retries of one call after its first failure
BACKOFF_S = 0.25     # first delay; doubles on each further failure
MAX_BACKOFF_S = 10.0
# Ranges of one read closer than this are fetched as one request (a val batch, in shard order,
# then costs a request or two, not one per sample); farther ones go concurrently.
MERGE_GAP = 16 << 10
MAX_MERGED = 32 << 20
# Concurrent connections of one process's S3 client (botocore's default, 10, would let a batch's
# range requests through ten at a time: ten round trips per 100 ranges).
S3_CONNECTIONS = 128

# What s3fs maps a malformed request to (a bad range, a too long name); retrying cannot help.
_PERMANENT_ERRNOS = (errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE)
# A local disk that refuses a write (full, over quota or file size limit, read-only): never a
# network failure to retry, and the message must name the local path.
LOCAL_WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
_USERINFO = re.compile(r"(\w+://)[^/@\s]*@")


class ObjectStoreError(OSError):
    """A read or write that failed for good; the message names the URL."""


class ObjectNotFound(ObjectStoreError, FileNotFoundError):
    """The object (or its bucket) does not exist."""


class ObjectAccessDenied(ObjectStoreError, PermissionError):
    """The credentials may not read or write the object (S3 also answers so for a missing object
    when they may not list the bucket)."""


class ShortRead(ObjectStoreError):
    """A read returned fewer bytes than asked: retried like a dropped connection."""


def is_object_url(s) -> bool:
    """Whether `s` is an object store URL this module reads (`s3://`, `gs://`, `gcs://`)."""
    return isinstance(s, str) and "://" in s and s.split("://", 1)[0] in SCHEMES


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, key) of `s3://bucket/key`; the key may be empty."""
    if not is_object_url(url):
        raise ValueError(f"{redact(url)!r} is not an object store URL ({', '.join(s + '://' for s in SCHEMES)})")
    scheme, rest = url.split("://", 1)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{redact(url)!r} names no bucket")
    return scheme, bucket, key


def redact(text: str) -> str:
    """`text` with any `user:password@` of a URL in it removed."""
    return _USERINFO.sub(r"\1", str(text))


def filesystem(url: str):
    """The fsspec file system for `url`'s scheme, in this process (s3fs / gcsfs, imported now)."""
    scheme = split_url(url)[0]
    package, pip_name = SCHEMES[scheme]
    try:
        importlib.import_module(package)
    except ImportError:
        raise ImportError(f"{scheme}:// URLs need the {package} package: pip install {pip_name}") from None
    import fsspec

    # No listings cache: a reader must see an object a writer has just put.
    options = {"use_listings_cache": False}
    if scheme == "s3":
        # botocore reads the same variables; passing the endpoint also keys fsspec's instance
        # cache on it, so a process that changes it gets a client for the new one.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        options["config_kwargs"] = {"max_pool_connections": S3_CONNECTIONS}
    return fsspec.filesystem(scheme, **options)


def _path(url: str) -> str:
    scheme, bucket, key = split_url(url)
    return f"{bucket}/{key}" if key else bucket


# -- reads ----------------------------------------------------------------------------------------

def _whole_object_options(url: str, fs) -> dict:
    """cat_file options for reading a whole object in one request. s3fs (since it splits whole
    reads) otherwise first asks for its size (a HEAD), to split an object over 50 MB into
    concurrent range requests: a second request, and round trip, for every manifest, index and
    run record, which are all small. Large objects (shards, checkpoints) are downloaded with
    get_file, which starts with one GET and splits only a large one. Older s3fs reads in one GET
    and has no such option. `fs`: url's file system."""
    if split_url(url)[0] != "s3":
        return {}
    return {"max_concurrency": 1} if _splits_whole_reads(type(fs)) else {}


@functools.cache
def _splits_whole_reads(fs_class) -> bool:
    return "max_concurrency" in inspect.signature(fs_class._cat_file).parameters


def get(url: str) -> bytes:
    """The whole object at `url` (one request)."""
    def read() -> bytes:
        fs = filesystem(url)
        return fs.cat_file(_path(url), **_whole_object_options(url, fs))

    return _retrying("read", url, read)


def get_many(urls: list[str]) -> list[bytes]:
    """Whole objects, fetched concurrently; in the order of `urls`."""
    return read_ranges(urls, [None] * len(urls), [None] * len(urls))


def read_ranges(urls: list[str], starts, ends, merge_gap: int = MERGE_GAP) -> list[bytes]:
    """Bytes [start, end) of each object `urls[i]`, fetched concurrently (None, None: the whole
    object); in the order asked. Ranges of one object less than `merge_gap` bytes apart are read as
    one request. Each failed range is retried with backoff; a missing object raises at once."""
    if not len(urls) == len(starts) == len(ends):
        raise ValueError("read_ranges: urls, starts and ends differ in length")
    wanted = [(u, None if s is None else int(s), None if e is None else int(e)) for u, s, e in zip(urls, starts, ends)]
    if not wanted:
        return []
    requests, where = _merge(wanted, merge_gap)  # where[i] is None for an empty range
    blobs: list[bytes | None] = [None] * len(requests)
    failures = 0
    while True:
        todo = [i for i, b in enumerate(blobs) if b is None]
        if not todo:
            break
        fs = filesystem(requests[todo[0]][0])  # one scheme per call (see below)
        got = fs.cat_ranges([_path(requests[i][0]) for i in todo], [requests[i][1] for i in todo],
                            [requests[i][2] for i in todo], on_error="return",
                            **_whole_object_options(requests[todo[0]][0], fs))
        errors = []
        progress = False
        for i, b in zip(todo, got):
            url, start, end = requests[i]
            if isinstance(b, BaseException):
                errors.append((url, b))
            elif start is not None and end is not None and len(b) != end - start:
                errors.append((url, ShortRead(f"{url}: bytes {start}-{end} returned {len(b)} bytes")))
            else:
                blobs[i] = b
                progress = True
        if errors:
            for url, err in errors:  # a missing object among them fails at once
                _raise_unless_transient("read", url, err)
            failures = 1 if progress else failures + 1  # any progress restarts the retry budget
            _wait(failures, "read", *errors[0], f"{len(errors)} range(s)")
    return [b"" if w is None else blobs[w[0]] if w[1:] == (0, None) else blobs[w[0]][w[1]:w[2]] for w in where]


def _merge(wanted, gap: int):
    """Requests covering `wanted` (url, start, end), nearby ranges of one object joined, and where
    each wanted range lies in them: (request, start in it, end in it or None for all of it), or
    None for an empty range."""
    schemes = {split_url(u)[0] for u, _, _ in wanted}
    if len(schemes) > 1:
        raise ValueError(f"read_ranges: one scheme per call, got {sorted(schemes)}")
    requests: list[list] = []
    where: list = [None] * len(wanted)
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i][0], wanted[i][1] is not None, wanted[i][1] or 0))
    for i in order:
        url, start, end = wanted[i]
        if start is not None and end is not None and end <= start:
            continue  # nothing to read (an empty member): no request
        if start is None or end is None:  # a whole object: its own request
            requests.append([url, start, end])
            where[i] = (len(requests) - 1, 0, None)
            continue
        last = requests[-1] if requests else None
        if (last is not None and last[0] == url and last[1] is not None and last[2] is not None
                and start - last[2] <= gap and max(end, last[2]) - last[1] <= MAX_MERGED):
            last[2] = max(last[2], end)
        else:
            requests.append([url, start, end])
        r = len(requests) - 1
        where[i] = (r, start - requests[r][1], end - requests[r][1])
    return [tuple(r) for r in requests], where


def size(url: str) -> int:
    """The object's size in bytes."""
    return int(_retrying("stat", url, lambda: filesystem(url).size(_path(url))))


def exists(url: str) -> bool:
    """Whether an object (or a prefix holding objects) exists at `url`."""
    return bool(_retrying("stat", url, lambda: filesystem(url).exists(_path(url))))


def listdir(url: str) -> dict[str, int]:
    """{name: size} of the objects directly under the prefix `url` (a "folder"); {} if none."""
    fs = filesystem(url)
    base = _path(url).rstrip("/")

    def ls():
        try:
            return fs.ls(base, detail=True)
        except FileNotFoundError:
            return []

    entries = _retrying("list", url, ls)
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
            if e.get("type") == "file"}


# -- writes ---------------------------------------------------------------------------------------

def put(url: str, data: bytes) -> None:
    """Store `data` at `url`: readers see the old object or all of the new one."""
    _retrying("write", url, lambda: filesystem(url).pipe_file(_path(url), bytes(data)))


def put_file(local_path: str | os.PathLike, url: str) -> None:
    """Upload the local file to `url`: readers see the old object or all of the new one."""
    _retrying("upload", url, lambda: filesystem(url).put_file(os.fspath(local_path), _path(url)))


def copy(src: str, dst: str) -> None:
    """Copy an object within its store (a server-side copy: nothing passes through this machine);
    readers of `dst` see the old object or all of the new one."""
    if split_url(src)[:2] != split_url(dst)[:2]:
        raise ValueError(f"copy: {redact(src)} and {redact(dst)} are not in one bucket")
    # Named by its source: a missing object is the source (the copy creates its target). cp_file
    # copies one object (a HEAD for its size, then the COPY); fsspec's copy would first list both
    # names, to tell folders from objects.
    _retrying(f"copy to {redact(dst)}", src, lambda: filesystem(src).cp_file(_path(src), _path(dst)))


def get_file(url: str, local_path: str | os.PathLike, check=None) -> None:
    """Download the object to `local_path`, atomically (a partial download never has its name).
    `check(tmp_path)`, if given, runs on the whole download before it takes the name; what it raises
    is retried if `is_transient` says so, else raised as an ObjectStoreError naming the URL, and the
    download is deleted."""
    local_path = os.fspath(local_path)
    tmp = os.path.join(os.path.dirname(local_path) or ".", f".{os.path.basename(local_path)}.partial")

    def download():
        try:
            filesystem(url).get_file(_path(url), tmp)
        except OSError as e:
            if e.errno in LOCAL_WRITE_ERRNOS:
                raise local_write_error(e, local_path) from None
            raise
        if check is not None:
            check(tmp)
        try:
            os.replace(tmp, local_path)
        except OSError as e:
            if e.errno in LOCAL_WRITE_ERRNOS:
                raise local_write_error(e, local_path) from None
            raise

    try:
        _retrying("download", url, download)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove(url: str) -> None:
    """Delete the object; a missing one is no error."""
    def rm():
        try:
            filesystem(url).rm_file(_path(url))
        except FileNotFoundError:
            pass

    _retrying("delete", url, rm)


# -- retries --------------------------------------------------------------------------------------

def _retrying(what: str, url: str, call):
    failures = 0
    while True:
        try:
            return call()
        except ImportError:
            raise  # a missing extra: its message says what to install
        except Exception as e:  # noqa: BLE001 - sorted below: permanent ones raise at once
            failures += 1
            _raise_unless_transient(what, url, e)
            _wait(failures, what, url, e)


def _raise_unless_transient(what: str, url: str, error: BaseException) -> None:
    if isinstance(error, FileNotFoundError):
        raise ObjectNotFound(f"{redact(url)}: no such object") from None
    if isinstance(error, PermissionError):
        raise ObjectAccessDenied(f"{redact(url)}: access denied ({describe(error)})") from None
    if not is_transient(error):
        raise ObjectStoreError(f"{redact(url)}: {what} failed ({describe(error)})") from None


def _wait(failures: int, what: str, url: str, error: BaseException, detail: str = "") -> None:
    if failures > RETRIES:
        raise ObjectStoreError(f"{redact(url)}: {what} failed after {RETRIES} retries ({describe(error)})") from None
    delay = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (failures - 1))
    log.warning("%s %s%s: %s; retry %d/%d in %.1fs", what, redact(url), f" ({detail})" if detail else "",
                describe(error), failures, RETRIES, delay)
    time.sleep(delay)


def local_write_error(error: OSError, path: str | os.PathLike) -> OSError:
    """An OSError naming the local `path` a write to was refused, and why (disk full, ...)."""
    return OSError(error.errno, f"{os.fspath(path)}: cannot write ({os.strerror(error.errno)})")


def local_write_failure(error: BaseException) -> OSError | None:
    """The refused local write behind `error`, if any: itself, or an OSError it was raised from
    (torch.save reports a full disk as a RuntimeError whose context is the OSError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in LOCAL_WRITE_ERRNOS:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def describe(error: BaseException) -> str:
    return redact(f"{type(error).__name__}: {error}")


def is_transient(error: BaseException) -> bool:
    """Whether retrying could help: a dropped or timed-out connection, a 5xx, throttling, a short
    read. A missing object, a refused permission or a malformed request is final."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                          FileExistsError)):
        return False
    if isinstance(error, (ShortRead, TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError):  # s3fs turns 5xx and throttling into OSError(EIO, ...)
        return error.errno not in _PERMANENT_ERRNOS + LOCAL_WRITE_ERRNOS
    package = type(error).__module__.split(".")[0]
    if package == "aiohttp":  # a payload cut short, a server that disconnected, ...
        return True
    if package == "botocore":
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

        if isinstance(error, (HTTPClientError, BotoConnectionError)):
            return True
        if isinstance(error, ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or status == 429 or "SlowDown" in str(error) or "Throttl" in str(error)
        return False  # no credentials, a bad parameter, ...
    status = getattr(error, "code", None)  # gcsfs's HttpError
    return isinstance(status, int) and (status >= 500 or status == 429)
