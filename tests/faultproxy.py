"""A fault-injecting HTTP/TCP proxy for the tests: put it in front of the lab's Glance, then break things.

    with FaultProxy(lab.glance_port) as proxy:       # listens on 127.0.0.1:<free port>, passes everything through
        proxy.burst_503(3)                           # the next 3 matching requests get 503, never forwarded
        proxy.reset_response(MiB, path=IMAGE_DATA)   # a download breaks (RST) after 1 MiB of its body
        proxy.reset_request(MiB, path=IMAGE_DATA, method="PUT")   # an upload breaks after 1 MiB of its body
        proxy.stall(5.0)                             # forward the request, hold the answer 5 s, then RST
        proxy.stall(5.0, after_bytes=MiB)            # ... or hold it after 1 MiB of its body
        proxy.drop_response(method="POST")           # Glance acts, but its answer is lost (RST)
        proxy.route(port, method="DELETE", path=...)  # matching requests go to another glance-api node instead
        proxy.pass_through()                         # disarm everything
        proxy.injected                               # Counter: what was injected, for a report

Each client connection carries exactly one request: the proxy rewrites `Connection: close` into the request
(and the response), so every request is a fresh TCP connection and a fault on one request cannot leak onto
the next. The lab's uWSGI answers `Connection: close` anyway. Faults are rules with a count; a rule is used
up only when it really fires (a reset-after-N rule does not fire on a body shorter than N bytes). Rules can
be armed and disarmed from any thread at any time. Every wait is bounded: each connection has a deadline,
sockets time out, a stall is capped, and stop() joins every thread with a timeout.
"""

from __future__ import annotations

import collections
import contextlib
import re
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final, Self

HOST: Final = "127.0.0.1"
IMAGE_DATA: Final = r"^/v2/images/[0-9a-f-]+/file$"  # GET: download, PUT: upload
API: Final = r"^/v2/"  # every Image API call (not the version discovery document at /)
MAX_HEAD: Final = 64 * 1024
CONNECTION_DEADLINE: Final = 300.0  # no connection lives longer than this, whatever happens
IDLE_TIMEOUT: Final = 120.0  # neither side sent a byte for this long: give up on the connection
MAX_STALL: Final = 600.0
TICK: Final = 0.2  # seconds between looks at the stop flag in every loop (reads wait this long for data)
SEND_TIMEOUT: Final = 60.0  # a peer that takes no byte for this long: the connection is given up
DRAIN_QUIET: Final = 10.0  # a 503's request body: stop reading it once the client sent nothing for this long
_HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection")


@dataclass
class Rule:
    kind: str  # "503", "reset_request", "reset_response", "drop_response", "stall", "route"
    remaining: int
    method: str | None
    path: re.Pattern[str]
    after_bytes: int | None = None  # body bytes that pass before the fault (a stall: None = before the head)
    seconds: float = 0.0
    retry_after: int | None = None  # a 503's Retry-After header (seconds), if any
    every: int = 1  # applies to every `every`-th matching request only (2: the 1st, 3rd, 5th...)
    port: int | None = None  # a route's upstream port
    seen: int = 0

    def matches(self, method: str, target: str) -> bool:
        """Does the rule apply to this request? (Counts it among the matching ones: call once per request.)"""
        if self.remaining <= 0 or (self.method is not None and self.method != method) or not self.path.search(target):
            return False
        self.seen += 1
        return (self.seen - 1) % self.every == 0


@dataclass
class Injection:
    kind: str
    method: str
    target: str
    detail: str = ""
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        return f"{self.kind} {self.method} {self.target} {self.detail}".strip()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = HOST) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self.port = 0
        self.injected: collections.Counter[str] = collections.Counter()
        self.injections: list[Injection] = []
        self.requests: collections.deque[str] = collections.deque(maxlen=5000)  # "METHOD target", newest last
        self.heads: collections.deque[str] = collections.deque(maxlen=200)  # request heads, token redacted
        self.request_count = 0
        self.errors: list[str] = []  # the proxy's own trouble (e.g. upstream unreachable), for a report

    # -- life cycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(128)
        listener.settimeout(TICK)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True)
        self._acceptor.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            self.errors.append(f"{len(alive)} connection thread(s) still alive {timeout} s after stop: {alive}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- arming faults (any thread) ---------------------------------------------------------------------

    def pass_through(self) -> None:
        """Disarm every rule: from now on every request and answer passes unchanged."""
        with self._lock:
            self._rules.clear()

    def burst_503(
        self, count: int, *, path: str = API, method: str | None = None, retry_after: int | None = None
    ) -> None:
        """Answer the next `count` matching requests with 503 (their body is read and dropped, not forwarded).

        With `retry_after`, the 503 carries `Retry-After: <seconds>`, as a server in maintenance may send.
        """
        self._arm(Rule("503", count, method, re.compile(path), retry_after=retry_after))

    def reset_response(self, after_bytes: int, *, times: int = 1, path: str = IMAGE_DATA, method: str = "GET") -> None:
        """Forward the request and the answer's head, then RST the client after `after_bytes` of the body."""
        self._arm(Rule("reset_response", times, method, re.compile(path), after_bytes=after_bytes))

    def reset_request(self, after_bytes: int, *, times: int = 1, path: str = IMAGE_DATA, method: str = "PUT") -> None:
        """Forward the request's head and `after_bytes` of its body, then RST both sides."""
        self._arm(Rule("reset_request", times, method, re.compile(path), after_bytes=after_bytes))

    def drop_response(self, *, times: int = 1, path: str = API, method: str | None = None, every: int = 1) -> None:
        """Forward the request, wait until Glance answers (so it has acted), then RST the client: a lost answer.

        `every=2` loses every other matching answer only, so that a retried request gets through.
        """
        self._arm(Rule("drop_response", times, method, re.compile(path), every=every))

    def stall(
        self,
        seconds: float,
        *,
        after_bytes: int | None = None,
        times: int = 1,
        path: str = API,
        method: str | None = None,
    ) -> None:
        """Forward the request, hold back the answer for `seconds` (at most MAX_STALL), then RST the client.

        The hold starts before the answer's head, or with `after_bytes` after that much of its body.
        """
        rule = Rule("stall", times, method, re.compile(path), after_bytes=after_bytes, seconds=min(seconds, MAX_STALL))
        self._arm(rule)

    def route(self, port: int, *, times: int = 1, path: str = API, method: str | None = None) -> None:
        """Forward the next `times` matching requests to 127.0.0.1:`port` instead of the upstream, unchanged: a
        load balancer that sends them to another glance-api node."""
        self._arm(Rule("route", times, method, re.compile(path), port=port))

    def armed(self) -> int:
        """Faults still to inject."""
        with self._lock:
            return sum(rule.remaining for rule in self._rules)

    def report(self) -> str:
        with self._lock:
            counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.injected.items())) or "nothing"
            lines = [
                f"fault proxy :{self.port} -> :{self.upstream[1]}: {self.request_count} request(s); injected {counts}"
            ]
            runs: list[list[Any]] = []  # consecutive identical injections, shown once with their count
            for injection in map(str, self.injections):
                if runs and runs[-1][0] == injection:
                    runs[-1][1] += 1
                else:
                    runs.append([injection, 1])
            lines += [f"  {text}" + (f" (x{n})" if n > 1 else "") for text, n in runs]
            lines += [f"  proxy error: {error}" for error in self.errors]
        return "\n".join(lines)

    def _arm(self, rule: Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _match(self, method: str, target: str) -> Rule | None:
        with self._lock:
            self.request_count += 1
            self.requests.append(f"{method} {target}")
            for rule in self._rules:
                if rule.matches(method, target):
                    if rule.kind in ("503", "route") or (rule.kind == "stall" and rule.after_bytes is None):  # now
                        detail = {"stall": f"{rule.seconds:.1f} s", "route": f"to :{rule.port}"}.get(rule.kind, "")
                        self._fired(rule, method, target, detail)
                    return rule
        return None

    def _take(self, rule: Rule, method: str, target: str, detail: str) -> bool:
        """A reset rule fires only if it is not used up meanwhile (by another connection)."""
        with self._lock:
            if rule.remaining <= 0:
                return False
            self._fired(rule, method, target, detail)
            return True

    def _fired(self, rule: Rule, method: str, target: str, detail: str) -> None:  # under self._lock
        rule.remaining -= 1
        self.injected[rule.kind] += 1
        self.injections.append(Injection(rule.kind, method, target, detail))

    # -- the proxy itself ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), name=f"faultproxy-conn-{self.port}")
            thread.daemon = True
            with self._lock:
                self._threads = {t for t in self._threads if t.is_alive()}
                self._threads.add(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        method, target = "?", "?"
        try:
            client.settimeout(SEND_TIMEOUT)  # for sendall(); every recv() comes after _ready() said it is ready
            deadline = time.monotonic() + CONNECTION_DEADLINE
            head, rest = self._read_head(client, deadline)
            if head is None:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("?", "?")
            self.heads.append(_redacted(head))
            rule = self._match(method, target)
            if rule is not None and rule.kind == "503":
                self._drain_body(client, head, rest, deadline)
                body = b'{"message": "503 injected by tests/faultproxy.py"}'
                extra = b"" if rule.retry_after is None else b"Retry-After: %d\r\n" % rule.retry_after
                client.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n%s"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (extra, len(body), body)
                )
                return
            address = (HOST, rule.port) if rule is not None and rule.kind == "route" and rule.port else self.upstream
            try:
                upstream = socket.create_connection(address, timeout=10)
            except OSError as e:
                with self._lock:
                    self.errors.append(f"{method} {target}: upstream {address}: {e}")
                _reset(client)
                return
            upstream.settimeout(SEND_TIMEOUT)
            upstream.sendall(_close_connection(head))
            self._pump(client, upstream, rest, method, target, rule, deadline)
        except OSError as e:  # a peer went away (or took no byte for SEND_TIMEOUT): nothing more to pass on
            with self._lock:
                self.errors.append(f"{method} {target}: {e!r}")
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _read_head(self, client: socket.socket, deadline: float) -> tuple[bytes | None, bytes]:
        buffer = b""
        idle_until = time.monotonic() + IDLE_TIMEOUT
        while b"\r\n\r\n" not in buffer:
            if self._stop.is_set() or time.monotonic() > min(deadline, idle_until) or len(buffer) > MAX_HEAD:
                return None, b""
            if not _readable(client):
                continue
            data = client.recv(65536)
            if not data:
                return None, b""
            buffer += data
            idle_until = time.monotonic() + IDLE_TIMEOUT
        head, _, rest = buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n", rest

    def _drain_body(self, client: socket.socket, head: bytes, rest: bytes, deadline: float) -> None:
        """Read (and drop) the request's body, as a real server answering 503 would, so the client sees the 503."""
        length = _content_length(head)
        chunked = b"chunked" in _header(head, b"transfer-encoding").lower()
        if length is None and not chunked:
            return  # no body
        seen, tail = len(rest), rest[-5:]
        quiet_until = time.monotonic() + DRAIN_QUIET
        while not self._stop.is_set() and time.monotonic() < min(deadline, quiet_until):
            if (length is not None and seen >= length) or (chunked and tail.endswith(b"0\r\n\r\n")):
                return
            if not _readable(client):
                continue
            data = client.recv(1 << 20)
            if not data:
                return
            seen += len(data)
            tail = (tail + data)[-5:]
            quiet_until = time.monotonic() + DRAIN_QUIET

    def _pump(
        self,
        client: socket.socket,
        upstream: socket.socket,
        rest: bytes,
        method: str,
        target: str,
        rule: Rule | None,
        deadline: float,
    ) -> None:
        """Relay both ways until the answer is complete, either side closes or a fault ends the connection."""
        relay = _Relay(self, client, upstream, method, target, rule)
        if rule is not None and rule.kind == "stall" and rule.after_bytes is None:
            relay.hold_until = time.monotonic() + rule.seconds
        idle_until = time.monotonic() + IDLE_TIMEOUT
        if rest and not relay.to_upstream(rest):
            return
        while not self._stop.is_set():
            now = time.monotonic()
            if now > min(deadline, idle_until):
                with self._lock:
                    self.errors.append(f"{method} {target}: connection given up (deadline or idle)")
                _reset(client)
                return
            if relay.hold_until and now > relay.hold_until:
                _reset(client)  # the stall is over: the client gave up long ago (or should have)
                return
            readable = [client] if relay.hold_until else [client, upstream]  # a held answer waits upstream
            for sock in _ready(readable):
                data = sock.recv(1 << 20)
                idle_until = time.monotonic() + IDLE_TIMEOUT
                if not data:  # the client gave up, or upstream finished its answer (Connection: close)
                    relay.finish()
                    return
                if not (relay.to_upstream(data) if sock is client else relay.to_client(data)):
                    return


class _Relay:
    """One request's bytes on their way, counted, and broken where a rule says so."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: socket.socket,
        upstream: socket.socket,
        method: str,
        target: str,
        rule: Rule | None,
    ) -> None:
        self.proxy, self.client, self.upstream = proxy, client, upstream
        self.method, self.target, self.rule = method, target, rule
        self.request = (method, target)
        self.request_sent = 0  # request body bytes forwarded
        self.response_head = b""
        self.head_done = False
        self.response_body = 0  # answer body bytes forwarded
        self.hold_until = 0.0  # a stall: the answer is not read from upstream before this (then: RST)

    def _cut(self, kinds: tuple[str, ...], data: bytes, sent: int) -> int | None:
        """Where to cut `data` if this rule breaks the connection within it, else None."""
        rule = self.rule
        if rule is None or rule.kind not in kinds or rule.after_bytes is None or sent + len(data) < rule.after_bytes:
            return None
        detail = f"after {rule.after_bytes} bytes" + (f", {rule.seconds:.1f} s" if rule.kind == "stall" else "")
        if not self.proxy._take(rule, self.method, self.target, detail):
            return None
        return max(rule.after_bytes - sent, 0)

    def _break(self, towards: socket.socket, data: bytes) -> bool:
        if data:
            towards.sendall(data)
        time.sleep(0.05)  # let the last bytes arrive before the reset
        _reset(self.client)
        _reset(self.upstream)
        return False

    def to_upstream(self, data: bytes) -> bool:
        """Forward request body bytes; False once the connection is broken on purpose."""
        cut = self._cut(("reset_request",), data, self.request_sent)
        if cut is not None:
            return self._break(self.upstream, data[:cut])
        self.upstream.sendall(data)
        self.request_sent += len(data)
        return True

    def to_client(self, data: bytes) -> bool:
        """Forward answer bytes; False once the connection is broken on purpose."""
        if not self.head_done:
            self.response_head += data
            if b"\r\n\r\n" not in self.response_head and len(self.response_head) <= MAX_HEAD:
                return True
            head, _, data = self.response_head.partition(b"\r\n\r\n")
            rule, status = self.rule, head.split(b" ", 2)[1:2]
            lost = f"answer {b''.join(status).decode()} lost"
            if rule is not None and rule.kind == "drop_response" and self.proxy._take(rule, *self.request, lost):
                return self._break(self.client, b"")
            self.client.sendall(_close_connection(head + b"\r\n\r\n"))
            self.head_done = True
            if rule is not None and rule.kind in ("reset_response", "stall") and status != [b"200"]:
                self.rule = None  # only a successful answer's body is broken
        cut = self._cut(("reset_response", "stall"), data, self.response_body)
        if cut is not None and self.rule is not None and self.rule.kind == "stall":
            if cut:
                self.client.sendall(data[:cut])
            self.hold_until = time.monotonic() + self.rule.seconds
            return True  # the rest of the answer waits (it is never sent)
        if cut is not None:
            return self._break(self.client, data[:cut])
        if data:
            self.client.sendall(data)
            self.response_body += len(data)
        return True

    def finish(self) -> None:
        if self.response_head and not self.head_done:
            self.client.sendall(self.response_head)


def _readable(sock: socket.socket) -> bool:
    return bool(_ready([sock]))


def _ready(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of `socks` with something to read within TICK, in their order. epoll, not select(): by the end of the
    suite the test process has more than 1,024 files open, past what select() takes."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        ready = {key.fileobj for key, _events in selector.select(TICK)}
    return [sock for sock in socks if sock in ready]


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0), as a crashing peer or a firewall does."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _redacted(head: bytes) -> str:
    lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    return "\n".join(
        f"{line.partition(':')[0]}: <redacted>" if line.lower().startswith("x-auth-token:") else line for line in lines
    )


def _header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


def _content_length(head: bytes) -> int | None:
    value = _header(head, b"content-length")
    return int(value) if value.isdigit() else None


def _close_connection(head: bytes) -> bytes:
    """The same head, with `Connection: close` instead of any keep-alive headers."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    kept = [lines[0]] + [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in _HOP_BY_HOP]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"
