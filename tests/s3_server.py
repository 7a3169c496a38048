"""A real S3 API on loopback for tests: moto's server mode in a subprocess (what s3fs's own tests
use), and a TCP proxy in front of it that injects faults (a response body cut halfway, a 503).

Tests reach them through the fixtures in conftest.py (`s3_server`, `s3_env`, `s3_bucket`,
`s3_proxy`); this module holds the machinery, so other test modules can reuse it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager

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
    """`python -m moto.server` on a free loopback port, until `stop()`."""

    def __init__(self, start_timeout_s: float = 60.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # Its log goes to a file: a pipe nobody reads fills up with one line per request, and
        # the server then blocks on writing the next one.
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
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


class FaultProxy:
    """A TCP proxy to `upstream` (host, port) that can, per call of `cut` / `fail`:

    - cut the body of the next n range responses (206) halfway: the headers and half the body are
      sent, then the connection is closed, as a server or network that drops mid-transfer would;
    - answer the next n connections' request with 503 SlowDown and close (throttling).

    `cuts_done` and `failures_done` count what it did, so a test can check that a fault happened.
    Every response it forwards says `Connection: close`, so each connection carries one request:
    the proxy never has to find where one response ends and the next begins (a HEAD's
    Content-Length announces a body that never comes), and every range read can be cut.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.cuts_left = self.failures_left = 0
        self.cuts_done = self.failures_done = 0
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

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self._take_failure():
            self._refuse(client)
            return
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pipe, args=(client, server), daemon=True).start()
        self._respond(server, client)

    def _refuse(self, client: socket.socket) -> None:
        try:
            client.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                block = client.recv(65536)
                if not block:
                    break
                head += block
            body = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
                    b"<Message>Please reduce your request rate.</Message></Error>")
            client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            _close(client)

    def _respond(self, server: socket.socket, client: socket.socket) -> None:
        """Forward the one response (headers rewritten to close), cutting its body if due."""
        buf = b""
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
            if status == 206 and length is not None and length >= 2 and self._take_cut():
                half = length // 2
                while len(body) < half:
                    block = server.recv(65536)
                    if not block:
                        break
                    body += block
                client.sendall(body[:half])
                return  # the finally clause drops both connections mid-body
            client.sendall(body)
            _pipe(server, client)  # the rest, until the client, told to close, hangs up
        except OSError:
            return
        finally:
            _close(server)
            _close(client)


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
