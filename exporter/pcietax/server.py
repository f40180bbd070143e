"""The HTTP(S) endpoint: /metrics (Prometheus text or OpenMetrics, gzip when asked), /-/healthy,
and a landing page. TLS handshakes and bcrypt checks happen in the connection's own thread, so a
slow client never holds up another scrape."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import logging
import socket
import ssl
import threading
from base64 import b64decode
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def parse_listen_address(addr: str) -> tuple[str, int]:
    """``:9817``, ``127.0.0.1:9817``, ``[::1]:9817`` -> (host, port); raises ValueError."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--web.listen-address {addr!r}: expected [HOST]:PORT, e.g. :9817 or 127.0.0.1:9817")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _AuthCache:
    """bcrypt is deliberately slow (~50-250 ms); remember good credentials by their SHA-256."""

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = users
        self._ok: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, header: str | None) -> bool:
        if not self._users:
            return True
        # The scheme name is case-insensitive (RFC 7617), as in Go's Request.BasicAuth.
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            user, _, pw = b64decode(header[6:].strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        digest = hashlib.sha256(f"{user}\0{pw}".encode()).digest()
        with self._lock:
            if any(hmac.compare_digest(digest, d) for d in self._ok):
                return True
        h = self._users.get(user)
        # Compare against a dummy hash for unknown users so timing does not reveal who exists.
        ok = bcrypt.checkpw(pw.encode(), h or _DUMMY) and h is not None
        if ok:
            with self._lock:
                if len(self._ok) < 1024:
                    self._ok.add(digest)
        return ok


def _san_allowed(cert: dict[str, Any] | None, allowed: frozenset[str]) -> bool:
    """exporter-toolkit's client_allowed_sans: any DNS, email, IP or URI SAN of the client's leaf."""
    sans = {str(v).strip() for _kind, v in (cert or {}).get("subjectAltName", ())}
    return bool(sans & allowed)


_DUMMY = bcrypt.hashpw(b"pcietax-dummy", bcrypt.gensalt(rounds=4))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: Any, web: Callable[[], WebConfig]) -> None:
        host = addr[0]
        if (host == "" and socket.has_dualstack_ipv6()) or ":" in host:
            self.address_family = socket.AF_INET6
        self._web = web
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's default prints a traceback to stderr; one debug line is enough for a
        # client that went away.
        log.debug("request from %s failed", client_address, exc_info=True)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        # The context of the current config: a rotated certificate serves the next connection.
        ctx = self._web().ssl_context
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


def make_server(
    address: str, registry: CollectorRegistry, web: WebConfig | WebConfigSource | None = None
) -> ThreadingHTTPServer:
    """``web``: a fixed WebConfig, or a WebConfigSource whose changes apply to new connections."""
    fixed = web if isinstance(web, WebConfig) else WebConfig()
    current: Callable[[], WebConfig] = web.current if isinstance(web, WebConfigSource) else lambda: fixed
    auths: dict[int, tuple[WebConfig, _AuthCache]] = {}
    auths_lock = threading.Lock()

    def auth_for(cfg: WebConfig) -> _AuthCache:
        # One cache of verified credentials per config: a reload that changes users starts afresh.
        with auths_lock:
            hit = auths.get(id(cfg))
            if hit is None or hit[0] is not cfg:
                auths.clear()
                hit = auths[id(cfg)] = (cfg, _AuthCache(cfg.users))
            return hit[1]

    class Handler(BaseHTTPRequestHandler):
        server_version = f"pcietax/{__version__}"
        timeout = 30

        def handle(self) -> None:
            # The handshake runs here, not in setup(): an exception there escapes to
            # socketserver's handle_error, which prints a traceback for every plain-HTTP probe
            # or client without a certificate.
            try:
                if isinstance(self.connection, ssl.SSLSocket):
                    self.connection.do_handshake()
                    sans = current().client_allowed_sans
                    if sans and not _san_allowed(self.connection.getpeercert(), sans):
                        log.info("client %s: certificate SAN not in client_allowed_sans",
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
            if not auth_for(current()).check(self.headers.get("Authorization")):
                self._send(401, b"Unauthorized\n", "text/plain",
                           {"WWW-Authenticate": 'Basic realm="pcietax"'})
                return
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                # pcietax's own registry writes the formats Prometheus negotiates itself
                # (sinks/prometheus.PcietaxRegistry.render); anything else goes through client_python.
                render = getattr(registry, "render", None)
                body = render(ctype) if render is not None else None
                if body is None:
                    body = encoder(registry)
                extra = {}
                if "gzip" in self.headers.get("Accept-Encoding", ""):
                    body, extra = gzip.compress(body, compresslevel=1), {"Content-Encoding": "gzip"}
                self._send(200, body, ctype, extra)
            elif path in ("/-/healthy", "/-/ready"):
                self._send(200, b"OK\n", "text/plain")
            elif path == "/":
                self._send(200, LANDING, "text/html; charset=utf-8")
            else:
                self._send(404, b"Not Found\n", "text/plain")

        do_HEAD = do_GET

    host, port = parse_listen_address(address)
    return _Server((host, port), Handler, current)
