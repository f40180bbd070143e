"""The HTTP(S) endpoint: /metrics (Prometheus text or OpenMetrics, gzip when asked), /-/healthy,
/-/ready and a landing page.

Anyone who can reach the port may be hostile, before TLS or auth, so every connection is bounded:
- at most ``Limits.max_connections`` connections are served at once, one daemon thread each; more
  wait in the kernel's listen backlog (128), which costs the process no file descriptor, so the
  descriptors the sources need are never taken by clients;
- the TLS handshake, request line and headers must all arrive within ``request_timeout`` (a whole
  deadline, not a per-receive timeout that one byte a second keeps alive), the whole connection
  within ``connection_timeout``;
- when every slot is taken and another client waits, the connections that are still sending their
  request after ``evict_after`` are closed to make room: a scrape sends its request at once, a
  slowloris never finishes. Under a flood the backlog drains at ``max_connections`` per
  ``evict_after`` (64 a second by default), so a scrape queued behind a full backlog of 128 stalled
  clients is answered within about 2 s.
TLS handshakes and bcrypt checks happen in the connection's own thread, so a slow client never
holds up another scrape."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import hmac
import logging
import os
import resource
import select
import selectors
import socket
import ssl
import threading
import time
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import bcrypt
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import __version__
from .webconfig import WebConfig, WebConfigSource

log = logging.getLogger("pcietax")

LANDING = f"""<html><head><title>pcietax</title></head><body>
<h1>pcietax {__version__}</h1><p>PCIe tax exporter: <a href="/metrics">/metrics</a></p>
</body></html>
""".encode()

# Probes must work with basic auth on (a kubelet has no credentials); they disclose nothing.
UNAUTHENTICATED = frozenset({"/-/healthy", "/-/ready"})
# bcrypt hashes only the first 72 bytes (bcrypt 5 raises on longer ones): a longer password is
# refused rather than silently truncated, so two passwords sharing 72 bytes never both work.
BCRYPT_MAX_PASSWORD = 72


@dataclass(frozen=True)
class Limits:
    max_connections: int = 64
    request_timeout: float = 10.0  # TLS handshake + request line + headers, in total
    connection_timeout: float = 60.0  # the whole connection, response included
    evict_after: float = 1.0  # see the module docstring
    backlog: int = 128  # socketserver's default of 5 drops scrapes under load
    fd_reserve: int = 256  # descriptors never used for connections: the sources' files and probes


def parse_listen_address(addr: str) -> tuple[str, int]:
    """``:9817``, ``127.0.0.1:9817``, ``[::1]:9817`` -> (host, port); raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--web.listen-address {addr!r}: expected [HOST]:PORT, e.g. :9817 or 127.0.0.1:9817")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def accepts_gzip(header: str) -> bool:
    """RFC 9110 Accept-Encoding: gzip with a q above 0, or ``*`` above 0 when gzip is not named."""
    star = None
    for item in header.split(","):
        coding, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        coding = coding.lower()
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q > 0
    return bool(star)


class RateLimitedLog:
    """One line per ``interval`` at most; the next line says how many were left out."""

    def __init__(self, interval: float = 60.0, level: int = logging.INFO,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval, self._level, self._clock = interval, level, clock
        self._next = float("-inf")
        self._dropped = 0
        self._lock = threading.Lock()

    def __call__(self, msg: str, *args: Any) -> None:
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._dropped += 1
                return
            dropped, self._dropped, self._next = self._dropped, 0, now + self._interval
        more = f" ({dropped} more since the last such line)" if dropped else ""
        log.log(self._level, msg + more, *args)


class _AuthCache:
    """bcrypt is deliberately slow (~50-250 ms); remember good credentials by their SHA-256."""

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> tuple[bool, str]:
        """(allowed, why not)."""
        if not self._users:
            return True, ""
        # The scheme name is case-insensitive (RFC 7617), as in Go's Request.BasicAuth.
        if not header or header[:6].lower() != "basic ":
            return False, "no basic-auth credentials"
        try:
            user, _, pw = b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, "malformed basic-auth header"
        secret = pw.encode()
        if len(secret) > BCRYPT_MAX_PASSWORD:
            return False, f"password longer than bcrypt's {BCRYPT_MAX_PASSWORD} bytes"
        digest = hashlib.sha256(f"{user}\0{pw}".encode()).digest()
        with self._lock:
            if any(hmac.compare_digest(digest, d) for d in self._ok):
                return True, ""
        h = self._users.get(user)
        try:
            # Compare against a dummy hash for unknown users so timing does not reveal who exists.
            ok = bcrypt.checkpw(secret, h or _DUMMY) and h is not None
        except ValueError as e:  # whatever else a bcrypt version refuses is a wrong password
            return False, f"bcrypt refused the password: {e}"
        if not ok:
            return False, "wrong user or password"
        with self._lock:
            if len(self._ok) < 1024:
                self._ok.add(digest)
        return True, ""


def _san_allowed(cert: dict[str, Any] | None, allowed: frozenset[str]) -> bool:
    """exporter-toolkit's client_allowed_sans: any DNS, email, IP or URI SAN of the client's leaf."""
    sans = {str(v).strip() for _kind, v in (cert or {}).get("subjectAltName", ())}
    return bool(sans & allowed)


_DUMMY = bcrypt.hashpw(b"pcietax-dummy", bcrypt.gensalt(rounds=4))


def connection_cap(limits: Limits) -> int:
    """max_connections, lowered so that ``fd_reserve`` descriptors stay for the sources."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    return max(1, min(limits.max_connections, soft - limits.fd_reserve))


class _Conn:
    __slots__ = ("addr", "closed", "reading", "sock", "t0")

    def __init__(self, sock: socket.socket, addr: Any, t0: float) -> None:
        self.sock, self.addr, self.t0 = sock, addr, t0
        self.reading = True  # until the request's headers are parsed
        self.closed = False


class _Server(HTTPServer):
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: Any, web: Callable[[], WebConfig],
                 limits: Limits) -> None:
        host = addr[0]
        if (host == "" and socket.has_dualstack_ipv6()) or ":" in host:
            self.address_family = socket.AF_INET6
        self._web = web
        self.limits = limits
        self.request_queue_size = limits.backlog
        self.cap = connection_cap(limits)
        self._slots = threading.BoundedSemaphore(self.cap)
        self._conns: dict[int, _Conn] = {}
        self._lock = threading.Lock()
        self._next_reap = 0.0
        self._log_closed = RateLimitedLog(60.0)
        self._log_busy = RateLimitedLog(60.0, logging.WARNING)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._stopped = threading.Event()
        self._stopped.set()  # not serving yet: a shutdown() before serve_forever() returns at once
        super().__init__(addr, handler)

    # -- the accept loop -----------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        """socketserver's loop, except that it sleeps while no connection is open: the deadlines
        (service_actions) only matter for open connections, and a fixed poll woke an idle exporter
        five times a second, a fifth of its CPU at rest. shutdown() wakes it through a pipe."""
        self._stopped.clear()
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 64)  # a wake left by an earlier shutdown()
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.socket, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping:
                    ready = sel.select(poll_interval if self.open_connections() else None)
                    if self._stopping:
                        break
                    if any(key.fileobj is self.socket for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._stopping = False
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr; one debug line is enough for a
        # client that went away.
        log.debug("request from %s failed", client_address, exc_info=True)

    # -- bounded accept ------------------------------------------------------------------------

    def get_request(self) -> tuple[socket.socket, Any]:
        # Called when the listening socket is readable. With every slot taken, make room by
        # closing a stalled request, and otherwise leave the client in the backlog: raising
        # OSError returns to serve_forever's select loop, which the wait here keeps from spinning.
        if not self._slots.acquire(timeout=0.05):
            self._reap(time.monotonic(), waiting=True)
            if not self._slots.acquire(timeout=0.1):
                self._log_busy("all %d connections busy: clients wait in the listen backlog", self.cap)
                raise OSError(errno.EBUSY, "all connections busy")
        try:
            sock, addr = self.socket.accept()
        except OSError as e:
            self._slots.release()
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._log_busy("accept: %s; raise LimitNOFILE (ulimit -n)", e.strerror)
                time.sleep(0.1)  # the socket stays readable: do not spin on it
            raise
        try:
            sock.settimeout(self.limits.request_timeout)  # a backstop per receive; the deadline is _reap
            # The context of the current config: a rotated certificate serves the next connection.
            ctx = self._web().ssl_context
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            self._slots.release()
            raise
        with self._lock:
            self._conns[id(sock)] = _Conn(sock, addr, time.monotonic())
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True,
                             name="pcietax-http")
        try:
            t.start()
        except BaseException:
            self._done(request)  # socketserver closes the socket
            raise

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._done(request)

    def _done(self, request: Any) -> None:
        with self._lock:
            c = self._conns.pop(id(request), None)
        if c is not None:
            self._slots.release()

    def responding(self, request: Any) -> None:
        """The request is in: its connection is no longer a slowloris candidate."""
        with self._lock:
            c = self._conns.get(id(request))
            if c is not None:
                c.reading = False

    # -- deadlines ---------------------------------------------------------------------------

    def service_actions(self) -> None:
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + 0.05
            self._reap(now)

    def _reap(self, now: float, waiting: bool = False) -> None:
        lim = self.limits
        victims: list[tuple[_Conn, str]] = []
        stalled: list[_Conn] = []
        with self._lock:
            for c in self._conns.values():
                if c.closed:
                    continue
                age = now - c.t0
                if c.reading and age > lim.request_timeout:
                    victims.append((c, f"request not complete within {lim.request_timeout:g}s"))
                elif age > lim.connection_timeout:
                    victims.append((c, f"connection open longer than {lim.connection_timeout:g}s"))
                elif waiting and c.reading and age > lim.evict_after:
                    stalled.append(c)
            # Every stalled request at once: the backlog drains at max_connections per evict_after,
            # so a scrape behind a flood waits seconds, not minutes. A connection with bytes we have
            # not read yet is not stalled: its handler thread is just behind (a busy CPU).
            for c in _without_unread(stalled):
                victims.append((c, f"request not complete after {now - c.t0:.1f}s while all {self.cap} "
                                   "connections were busy"))
            for c, _ in victims:
                c.closed = True
        for c, why in victims:
            self._log_closed("closed connection from %s: %s", c.addr[0] if c.addr else "?", why)
            # The plain socket's shutdown, also for an SSLSocket: it wakes the thread blocked in
            # recv or the handshake without touching the TLS state that thread is using.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(c.sock, socket.SHUT_RDWR)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)


def _without_unread(conns: list[_Conn]) -> list[_Conn]:
    """The connections whose kernel receive buffer is empty (poll: not readable now)."""
    if not conns:
        return []
    p = select.poll()
    by_fd = {}
    for c in conns:
        try:
            fd = c.sock.fileno()
        except (OSError, ValueError):
            continue
        if fd >= 0:
            by_fd[fd] = c
            p.register(fd, select.POLLIN)
    readable = {fd for fd, ev in p.poll(0) if ev & select.POLLIN}
    return [c for fd, c in by_fd.items() if fd not in readable]


def make_server(
    address: str, registry: CollectorRegistry, web: WebConfig | WebConfigSource | None = None,
    *, ready: Callable[[], bool] | None = None, limits: Limits | None = None,
) -> _Server:
    """``web``: a fixed WebConfig, or a WebConfigSource whose changes apply to new connections.
    ``ready``: whether the first complete collection cycle is done; until then /-/ready and /metrics
    answer 503 (None: always ready)."""
    fixed = web if isinstance(web, WebConfig) else WebConfig()
    current: Callable[[], WebConfig] = web.current if isinstance(web, WebConfigSource) else lambda: fixed
    is_ready: Callable[[], bool] = ready or (lambda: True)
    lim = limits or Limits()
    auths: dict[int, tuple[WebConfig, _AuthCache]] = {}
    auths_lock = threading.Lock()
    log_401 = RateLimitedLog(60.0)
    log_500 = RateLimitedLog(60.0, logging.WARNING)

    def auth_for(cfg: WebConfig) -> _AuthCache:
        # One cache of verified credentials per config: a reload that changes users starts afresh.
        with auths_lock:
            hit = auths.get(id(cfg))
            if hit is None or hit[0] is not cfg:
                auths.clear()
                hit = auths[id(cfg)] = (cfg, _AuthCache(cfg.users))
            return hit[1]

    class Handler(BaseHTTPRequestHandler):
        # No Python version in Server: (BaseHTTPRequestHandler adds it by default).
        server_version = f"pcietax/{__version__}"
        timeout = lim.request_timeout
        server: _Server

        def version_string(self) -> str:
            return self.server_version

        def handle(self) -> None:
            # The handshake runs here, not in setup(): an exception there escapes to
            # socketserver's handle_error, which prints a traceback for every plain-HTTP probe
            # or client without a certificate.
            try:
                if isinstance(self.connection, ssl.SSLSocket):
                    self.connection.do_handshake()
                    sans = current().client_allowed_sans
                    if sans and not _san_allowed(self.connection.getpeercert(), sans):
                        log_401("client %s: certificate SAN not in client_allowed_sans",
                                self.client_address[0])
                        return
                super().handle()
            except (ssl.SSLError, OSError) as e:
                log.debug("connection from %s closed: %s", self.client_address, e)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.client_address[0], *args)

        def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in {**current().headers, **(extra or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            self.server.responding(self.request)
            try:
                self._route()
            except (ssl.SSLError, OSError):
                raise  # the client went away: handle() logs it at debug
            except Exception as e:
                log_500("%s %s: %s: %s", self.command, self.path[:200], type(e).__name__, e)
                self._send(500, b"Internal Server Error\n", "text/plain")

        def _route(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/-/healthy":
                self._send(200, b"OK\n", "text/plain")
                return
            if path == "/-/ready":
                if is_ready():
                    self._send(200, b"OK\n", "text/plain")
                else:
                    self._send(503, b"starting: the first collection cycle is not complete\n", "text/plain")
                return
            ok, why = auth_for(current()).check(self.headers.get("Authorization"))
            if not ok:
                log_401("401 for %s %s: %s", self.client_address[0], path[:200], why)
                self._send(401, b"Unauthorized\n", "text/plain",
                           {"WWW-Authenticate": 'Basic realm="pcietax"'})
                return
            if path == "/metrics":
                if not is_ready():
                    self._send(503, b"starting: the first collection cycle is not complete\n", "text/plain",
                               {"Retry-After": "1"})
                    return
                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                # pcietax's own registry writes the formats Prometheus negotiates itself
                # (sinks/prometheus.PcietaxRegistry.render); anything else goes through client_python.
                render = getattr(registry, "render", None)
                body = render(ctype) if render is not None else None
                if body is None:
                    body = encoder(registry)
                extra = {}
                if accepts_gzip(self.headers.get("Accept-Encoding", "")):
                    body, extra = gzip.compress(body, compresslevel=1), {"Content-Encoding": "gzip"}
                self._send(200, body, ctype, extra)
            elif path == "/":
                self._send(200, LANDING, "text/html; charset=utf-8")
            else:
                self._send(404, b"Not Found\n", "text/plain")

        do_HEAD = do_GET

    host, port = parse_listen_address(address)
    srv = _Server((host, port), Handler, current, lim)
    if srv.cap < lim.max_connections:
        log.info("serving at most %d connections at once: RLIMIT_NOFILE keeps %d descriptors for the "
                 "sources", srv.cap, lim.fd_reserve)
    return srv


def raise_nofile_limit(ceiling: int = 1 << 20) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one, as Go programs (node_exporter) do at start;
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(ceiling, hard) if hard != resource.RLIM_INFINITY else ceiling
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as e:
        log.debug("cannot raise RLIMIT_NOFILE to %d: %s", want, e)
        return soft
    return want
