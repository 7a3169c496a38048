"""HTTP(S) reads that survive a flaky server: timeouts, retries with backoff, and a read that
fails midway resumes from the byte it reached (a Range request) instead of starting over."""
from __future__ import annotations

import logging
import socket
import time
import urllib.error
import urllib.request
from http.client import HTTPException

log = logging.getLogger(__name__)

RETRYABLE = (urllib.error.URLError, HTTPException, ConnectionError, socket.timeout, TimeoutError, OSError)


class HTTPReadError(OSError):
    """A read that failed for good; `status` is the HTTP status when the server refused it."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def http_get(url: str, **kw) -> bytes:
    """GET the whole body of `url` (see http_stream for the retry behaviour)."""
    return b"".join(http_stream(url, **kw))


def http_stream(url: str, timeout: float = 30.0, retries: int = 6, backoff: float = 0.2,
                max_backoff: float = 5.0, chunk: int = 1 << 20):
    """Yield the body of `url` in chunks. A dropped connection or timeout is retried with
    exponential backoff, continuing from the last byte yielded (a Range request); any progress
    resets the retry budget. Missing files (404, 403, 410) fail at once."""
    got = 0
    total = None
    failures = 0
    while True:
        req = urllib.request.Request(url, headers={"Range": f"bytes={got}-"} if got else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                skip = 0
                if got and resp.status != 206:
                    skip = got  # the server ignored the Range and resends from byte 0
                if total is None:
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length is not None else None
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    if skip:
                        drop = min(skip, len(block))
                        block, skip = block[drop:], skip - drop
                        if not block:
                            continue
                    got += len(block)
                    failures = 0
                    yield block
            if total is None or got >= total:
                return
            raise HTTPReadError(f"connection closed at byte {got} of {total}")
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 404, 410):
                raise HTTPReadError(f"{url}: HTTP {e.code} {e.reason}", e.code) from None
            err: Exception = e
        except RETRYABLE as e:
            err = e
        failures += 1
        if failures > retries:
            raise HTTPReadError(f"{url}: giving up after {retries} retries at byte {got} ({err})") from None
        delay = min(max_backoff, backoff * 2 ** (failures - 1))
        log.warning("%s: %s; retry %d/%d at byte %d in %.1fs", url, err, failures, retries, got, delay)
        time.sleep(delay)
