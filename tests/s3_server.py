"""A real S3 API on loopback for tests: moto's server mode in a subprocess (what s3fs's own tests
use; `serve` below), and a TCP proxy in front of it that injects faults, chosen by method and key:
S3 errors (503, 403 AccessDenied, 404 NoSuchKey), a connection cut during an upload or a
download, a request held unanswered (so a test can kill its client there).

Tests reach them through the fixtures in conftest.py (`s3_server`, `s3_env`, `s3_bucket`,
`s3_proxy`); this module holds the machinery, so other test modules can reuse it.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

# Dummy credentials: the standard chain reads them from the environment, as it would real ones.
TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# Settings that must not leak in from the machine running the tests.
CLEARED_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
               "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's S3 server (`serve`, below) on a free loopback port, until `stop()`."""

    def __init__(self, start_timeout_s: float = 60.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # Its log goes to a file: a pipe nobody reads fills up with one line per request, and
        # the server then blocks on writing the next one.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "127.0.0.1", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer on port {self.port}") from None
                time.sleep(0.1)

    def tail(self, n: int = 2000) -> str:
        """The end of the server's log."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def serve(host: str, port: int) -> None:
    """Run what `python -m moto.server -H host -p port` runs (moto's WSGI application, werkzeug's
    threaded server), with the service behind each request looked up once per host name: moto
    looks it up on every request by listing its own package folder (a stat of each of its ~170
    service folders), about 40% of its CPU time for a small request (a HEAD, a small GET)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    os.environ.setdefault("MOTO_PORT", str(port))  # as moto.server sets it: the URLs moto gives of itself

    class Application(DomainDispatcherApplication):
        def __init__(self, create_app):
            super().__init__(create_app)
            self.backends: dict[str | None, object] = {}

        def get_backend_for_host(self, host):  # called under self.lock
            if host not in self.backends:
                self.backends[host] = super().get_backend_for_host(host)
            return self.backends[host]

    run_simple(host, port, Application(create_backend_app), threaded=True)


def env_for(endpoint: str) -> dict[str, str]:
    """The environment that points the standard credential chain and endpoint at a test server."""
    return {**TEST_ENV, "AWS_ENDPOINT_URL": endpoint}


@contextmanager
def server_environment(endpoint: str):
    """Set env_for(endpoint) in os.environ for the block (for session-scoped setup; tests use
    monkeypatch through the `s3_env` fixture)."""
    saved = {k: os.environ.get(k) for k in (*TEST_ENV, "AWS_ENDPOINT_URL", *CLEARED_ENV)}
    for k in CLEARED_ENV:
        os.environ.pop(k, None)
    os.environ.update(env_for(endpoint))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Error answers the proxy can give instead of the server's: status -> (reason, S3 code, message).
ERROR_ANSWERS = {
    403: ("Forbidden", "AccessDenied", "Access Denied"),
    404: ("Not Found", "NoSuchKey", "The specified key does not exist."),
    500: ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    503: ("Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Request:
    """One request the proxy saw: `method` is COPY for a PUT with x-amz-copy-source (a server-side
    copy); `key` is "bucket/key" (a bucket request: "bucket"); `status` is what the client got,
    None until its answer (or for ever, if it was held or cut); `fault` the action applied."""
    method: str
    key: str
    query: str
    headers: dict[str, str]
    status: int | None = None
    fault: str | None = None


class Fault:
    """What the proxy does to requests whose method is `method` (None: any) and whose key matches
    the regular expression `key` (re.search; None: any): it applies `action` to the next `times`
    of them (None: all). Actions:

    - "403", "404", "500", "503": answer with that S3 error (AccessDenied, NoSuchKey,
      InternalError, SlowDown); the server never sees the request;
    - "cut-request": pass the request line and half the body on, then close both connections (a
      connection cut during an upload: the server gets no complete request);
    - "cut-response": pass the request on, then the headers and half the answer's body, and close;
    - "hold": keep the connection open, the request unanswered and never passed on, until
      `release()` (a server or network that hangs): the client waits, so a test can kill it there;
    - "stall": pass the request on, then the answer's headers and half its body, and hang as
      "hold" does (a download stuck midway: part of the file is written).

    `seen` counts the matching requests, `done` the faults applied. `release()` ends the fault:
    held connections are closed, unanswered, and later requests pass.
    """

    ACTIONS = ("403", "404", "500", "503", "cut-request", "cut-response", "hold", "stall")

    def __init__(self, action: str, method: str | None = None, key: str | None = None, times: int | None = None,
                 ranged: bool | None = None):
        if action not in self.ACTIONS:
            raise ValueError(f"fault action {action!r}: expected one of {', '.join(self.ACTIONS)}")
        self.action, self.method, self.times, self.ranged = action, method, times, ranged
        self.key = re.compile(key) if key is not None else None
        self.seen = self.done = 0
        self.released = threading.Event()

    def matches(self, request: Request) -> bool:
        return (self.method is None or self.method == request.method) and \
            (self.key is None or self.key.search(request.key) is not None) and \
            (self.ranged is None or ("range" in request.headers) == self.ranged)

    def release(self) -> None:
        self.released.set()


class FaultProxy:
    """A TCP proxy to `upstream` (host, port) that injects faults into the requests it passes on.

    `inject(action, method=..., key=..., times=...)` adds a Fault (see there: S3 errors, cuts in
    either direction, a held or stalled connection) for the requests it matches; `requests` lists
    every request seen, with the status its client got. Two older shortcuts, by count:

    - `cut(n)`: cut the body of the next n range responses (206) halfway: the headers and half the
      body are sent, then the connection is closed, as a server or network that drops
      mid-transfer would;
    - `fail(n)`: answer the next n connections' request with 503 SlowDown (throttling).

    `cuts_done` and `failures_done` count what those did, so a test can check that a fault happened.
    `latency_s` holds every request that long before it is passed on (a distant store: the time to
    the first byte); `gets(key)` counts the GETs of keys matching a regular expression.
    Every response it forwards says `Connection: close`, so each connection carries one request:
    the proxy never has to find where one response ends and the next begins (a HEAD's
    Content-Length announces a body that never comes), and every request can be matched.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.cuts_left = self.failures_left = 0
        self.cuts_done = self.failures_done = 0
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self.latency_s = 0.0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def cut(self, n: int = 1) -> None:
        with self._lock:
            self.cuts_left += n

    def fail(self, n: int = 1) -> None:
        with self._lock:
            self.failures_left += n

    def inject(self, action: str, method: str | None = None, key: str | None = None,
               times: int | None = None, ranged: bool | None = None) -> Fault:
        """Add a fault (see Fault); it applies from the next request on, to range requests only
        (`ranged=True`), to the others only (False), or to both (None). Returns it, to count and
        release."""
        fault = Fault(action, method, key, times, ranged)
        with self._lock:
            self.faults.append(fault)
        return fault

    def gets(self, key: str | None = None, ranged: bool | None = None) -> list[Request]:
        """The GET requests seen whose key matches the regular expression `key` (None: any); only
        range requests (`ranged=True`) or only whole-object ones (False), or both (None)."""
        with self._lock:
            seen = list(self.requests)
        pattern = re.compile(key) if key is not None else None
        return [r for r in seen if r.method == "GET" and (pattern is None or pattern.search(r.key))
                and (ranged is None or ("range" in r.headers) == ranged)]

    def clear(self) -> None:
        """Remove every fault, closing any connection one holds."""
        with self._lock:
            faults, self.faults = self.faults, []
        for f in faults:
            f.release()

    def _take_cut(self) -> bool:
        with self._lock:
            if self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            self.cuts_done += 1
            return True

    def _take_failure(self) -> bool:
        with self._lock:
            if self.failures_left <= 0:
                return False
            self.failures_left -= 1
            self.failures_done += 1
            return True

    def _take_fault(self, request: Request) -> Fault | None:
        with self._lock:
            self.requests.append(request)
            for f in self.faults:
                if f.released.is_set() or not f.matches(request):
                    continue
                f.seen += 1
                if f.times is None or f.done < f.times:
                    f.done += 1
                    request.fault = f.action
                    return f
            return None

    def close(self) -> None:
        self._closed = True
        self.clear()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(60)
            head, rest = _read_head(client)
        except OSError:
            _close(client)
            return
        if head is None:
            _close(client)
            return
        request = _parse_request(head)
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        if self._take_failure():
            with self._lock:
                self.requests.append(request)
            request.fault = "503"
            self._answer_error(client, request, 503, rest)
            return
        fault = self._take_fault(request)
        action = fault.action if fault is not None else None
        if action is not None and action.isdigit():
            self._answer_error(client, request, int(action), rest)
            return
        if action == "hold":
            self._hold(fault)
            _close(client)
            return
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            _close(client)
            return
        if action == "cut-request":
            self._cut_request(client, server, request, head, rest)
            return
        try:
            server.sendall(head + rest)
        except OSError:
            _close(server)
            _close(client)
            return
        client.settimeout(None)
        threading.Thread(target=_pipe, args=(client, server), daemon=True).start()
        self._respond(server, client, request, fault)

    def _hold(self, fault: Fault) -> None:
        while not self._closed and not fault.released.wait(0.05):
            pass

    def _answer_error(self, client: socket.socket, request: Request, status: int, rest: bytes) -> None:
        """Answer with an S3 error, the request's body (if the client sends it at once) read first."""
        reason, code, message = ERROR_ANSWERS[status]
        try:
            if request.headers.get("expect", "").lower() != "100-continue":
                _drain(client, int(request.headers.get("content-length") or 0) - len(rest))
            body = b"" if request.method == "HEAD" else (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Key>{request.key.partition('/')[2]}</Key></Error>").encode()
            client.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            request.status = status
        except OSError:
            pass
        finally:
            _close(client)

    def _cut_request(self, client: socket.socket, server: socket.socket, request: Request, head: bytes,
                     rest: bytes) -> None:
        """Pass the request line, headers and half the body on, then drop both connections. The
        server's interim answer (100 Continue) reaches the client, so it starts sending the body."""
        half = int(request.headers.get("content-length") or 0) // 2
        try:
            server.sendall(head + rest[:half])
            sent = min(len(rest), half)
            threading.Thread(target=_pipe, args=(server, client), daemon=True).start()
            while sent < half:
                block = client.recv(min(65536, half - sent))
                if not block:
                    break
                server.sendall(block)
                sent += len(block)
        except OSError:
            pass
        finally:
            _close(server)
            _close(client)

    def _respond(self, server: socket.socket, client: socket.socket, request: Request, fault: Fault | None) -> None:
        """Forward the one response (headers rewritten to close), cutting or stalling its body if due."""
        buf = b""
        action = fault.action if fault is not None else None
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    block = server.recv(65536)
                    if not block:
                        client.sendall(buf)
                        return
                    buf += block
                head, _, body = buf.partition(b"\r\n\r\n")
                lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
                status, length = _status_and_length(lines)
                if not 100 <= status < 200:
                    break
                client.sendall(head + b"\r\n\r\n")  # an interim response (100 Continue): the real one follows
                buf = body
            client.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n")
            request.status = status
            halved = action in ("cut-response", "stall") and length is not None and length >= 2 and \
                request.method != "HEAD"
            if halved or (status == 206 and length is not None and length >= 2 and self._take_cut()):
                half = length // 2
                while len(body) < half:
                    block = server.recv(65536)
                    if not block:
                        break
                    body += block
                client.sendall(body[:half])
                if action == "stall":
                    self._hold(fault)
                return  # the finally clause drops both connections mid-body
            client.sendall(body)
            _pipe(server, client)  # the rest, until the client, told to close, hangs up
        except OSError:
            return
        finally:
            _close(server)
            _close(client)


def _read_head(client: socket.socket) -> tuple[bytes | None, bytes]:
    """(request line and headers with their blank line, the body bytes read with them); None if the
    client hung up first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        block = client.recv(65536)
        if not block:
            return None, b""
        buf += block
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _parse_request(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "/")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")
    if method == "PUT" and "x-amz-copy-source" in headers:
        method = "COPY"
    return Request(method, urllib.parse.unquote(path.lstrip("/")), query, headers)


def _drain(s: socket.socket, n: int) -> None:
    while n > 0:
        block = s.recv(min(65536, n))
        if not block:
            return
        n -= len(block)


def _status_and_length(lines: list[bytes]) -> tuple[int, int | None]:
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, None
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return status, length


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            block = src.recv(65536)
            if not block:
                break
            dst.sendall(block)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


if __name__ == "__main__":  # the server process MotoServer starts: HOST PORT
    serve(sys.argv[1], int(sys.argv[2]))
