"""``--web.config.file`` in the Prometheus exporter-toolkit format: TLS, client certificates,
basic auth with bcrypt hashes, extra response headers. Unknown keys are an error (as in
exporter-toolkit), and relative paths are relative to the file itself."""

from __future__ import annotations

import logging
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("pcietax")


class WebConfigError(ValueError):
    pass


CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "RequireClientCert": ssl.CERT_REQUIRED,  # exporter-toolkit's older name for the one above
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_KEYS = {
    "cert_file", "key_file", "cert", "key", "client_ca", "client_auth_type", "client_ca_file",
    "min_version", "max_version",
    "cipher_suites", "curve_preferences", "prefer_server_cipher_suites", "client_allowed_sans",
}
_HTTP_KEYS = {"http2", "headers"}
# exporter-toolkit's allow-list (kept the same across the Prometheus ecosystem): header -> allowed
# values, None for any one-line value.
HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
# Go's names (what exporter-toolkit configs carry) -> OpenSSL's, for the TLS 1.2 suites Go offers.
# TLS 1.3 suites are not configurable, as in Go.
CIPHER_SUITES = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
CURVES = {"CurveP256", "CurveP384", "CurveP521", "X25519"}
# $2a$/$2b$/$2y$, a two-digit cost, then 22 salt + 31 hash characters of bcrypt's base64.
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_FIX_HASH = (
    "make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'` or python3 -c 'import bcrypt; "
    "print(bcrypt.hashpw(b\"secret\", bcrypt.gensalt()).decode())'"
)
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)
    # Client certificates must carry one of these SANs (DNS, email, IP or URI); empty: any.
    client_allowed_sans: frozenset[str] = frozenset()
    # The files this config was built from (itself, certificate, key, CA): a change reloads it.
    files: tuple[Path, ...] = ()


def _err(path: Path, what: str) -> WebConfigError:
    return WebConfigError(f"--web.config.file {path}: {what}")


def _mapping(path: Path, section: str, value: Any, fix: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, f"{section} must be a mapping ({fix}), got {type(value).__name__} {value!r}")
    return value


def _check_keys(section: str, got: dict[str, Any], allowed: set[str], path: Path) -> None:
    unknown = sorted(str(k) for k in set(got) - allowed)
    if unknown:
        raise _err(path, f"unknown field(s) {unknown} in {section or 'the top level'}; "
                         f"allowed: {sorted(allowed)}")


def load(path: str | Path) -> WebConfig:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise _err(p, f"cannot read it: {e.strerror}; give a readable file or drop the flag") from e
    except UnicodeDecodeError as e:
        raise _err(p, f"is not UTF-8 text: {e}") from e
    except yaml.YAMLError as e:
        raise _err(p, f"is not valid YAML: {e}") from e
    raw = _mapping(p, "the file", raw, "tls_server_config, http_server_config, basic_auth_users")
    _check_keys("", raw, _TOP_KEYS, p)
    cfg = WebConfig(files=(p,))
    tls = _mapping(p, "tls_server_config", raw.get("tls_server_config"), "cert_file, key_file, ...")
    _check_keys("tls_server_config", tls, _TLS_KEYS, p)
    # As in exporter-toolkit: TLS is on when any certificate setting is given; an empty section
    # means plain HTTP.
    if any(tls.get(k) for k in ("cert_file", "key_file", "cert", "key", "client_ca_file", "client_ca",
                                "client_auth_type")):
        cfg.ssl_context = _ssl_context(tls, p.parent, p)
        named = ("cert_file", "key_file", "client_ca_file")
        cfg.files += tuple(Path(_resolve(p.parent, tls[k])) for k in named if tls.get(k))
        sans = tls.get("client_allowed_sans") or []
        if not isinstance(sans, list):
            raise _err(p, "tls_server_config.client_allowed_sans must be a list of names")
        if sans and cfg.ssl_context.verify_mode == ssl.CERT_NONE:
            raise _err(p, "tls_server_config.client_allowed_sans needs client certificates; "
                          "set client_auth_type: RequireAndVerifyClientCert")
        cfg.client_allowed_sans = frozenset(str(x) for x in sans)
    http = _mapping(p, "http_server_config", raw.get("http_server_config"), "headers, http2")
    _check_keys("http_server_config", http, _HTTP_KEYS, p)
    headers = _mapping(p, "http_server_config.headers", http.get("headers"), "header name: value")
    for k, v in headers.items():
        if k not in HEADERS:
            raise _err(p, f"http_server_config.headers: {k!r} cannot be configured; allowed (as in "
                          f"exporter-toolkit): {sorted(HEADERS)}")
        allowed = HEADERS[k]
        if not isinstance(v, str) or any(c in v for c in "\r\n"):
            # A newline would let the config inject raw HTTP into every response.
            raise _err(p, f"http_server_config.headers.{k}: needs a one-line text value")
        if allowed is not None and v not in allowed:
            raise _err(p, f"http_server_config.headers.{k}: {v!r} is not one of {list(allowed)}")
    cfg.headers = {str(k): str(v) for k, v in headers.items()}
    users = _mapping(p, "basic_auth_users", raw.get("basic_auth_users"), "user name: bcrypt hash")
    for user, h in users.items():
        m = _BCRYPT.fullmatch(str(h))
        if not m or not 4 <= int(m.group(1)) <= 31:
            raise _err(p, f"basic_auth_users.{user} is not a bcrypt hash; {_FIX_HASH}")
        if ":" in str(user):
            raise _err(p, f"basic_auth_users: user name {user!r} cannot contain ':' (HTTP basic auth)")
        cfg.users[str(user)] = str(h).encode()
    return cfg


def _resolve(base: Path, value: Any) -> str:
    q = Path(str(value))
    return str(q if q.is_absolute() else base / q)


def _load_cert_chain(ctx: ssl.SSLContext, tls: dict[str, Any], base: Path, path: Path) -> None:
    """cert_file/key_file, or the inline PEM of ``cert``/``key`` (OpenSSL reads keys only from
    files, so inline ones go through a private temporary file that is removed at once)."""
    for a, b in (("cert_file", "cert"), ("key_file", "key")):
        if tls.get(a) and tls.get(b):
            raise _err(path, f"tls_server_config: give {a} or {b}, not both")
        if not tls.get(a) and not tls.get(b):
            raise _err(path, f"tls_server_config needs {a} (a PEM path, relative to this file) or "
                             f"{b} (inline PEM); both a certificate and a key are required")
    with tempfile.TemporaryDirectory(prefix="pcietax-tls-") as tmp:
        paths = {}
        for a, b in (("cert_file", "cert"), ("key_file", "key")):
            if tls.get(a):
                paths[a] = _resolve(base, tls[a])
            else:
                inline = Path(tmp, b)
                inline.touch(mode=0o600)
                inline.write_text(str(tls[b]))
                paths[a] = str(inline)
        _load_pair(ctx, paths["cert_file"], paths["key_file"], path)


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str, path: Path) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    # SSLError is an OSError: catch it first.
    except ssl.SSLError as e:
        raise _err(path, f"tls_server_config.cert_file {cert} / key_file {key}: not a matching PEM "
                         f"certificate and key: {e}") from e
    except OSError as e:
        raise _err(path, f"tls_server_config.cert_file/key_file: cannot read {e.filename or cert}: "
                         f"{e.strerror}") from e


def _ssl_context(tls: dict[str, Any], base: Path, path: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_cert_chain(ctx, tls, base, path)
    ctx.minimum_version = _version(tls.get("min_version") or "TLS12", "min_version", path)
    if tls.get("max_version"):
        ctx.maximum_version = _version(tls["max_version"], "max_version", path)
        if ctx.maximum_version < ctx.minimum_version:
            raise _err(path, f"tls_server_config.max_version {tls['max_version']} is below min_version "
                             f"{tls.get('min_version') or 'TLS12'}; no client could connect")
    auth = tls.get("client_auth_type") or "NoClientCert"
    if auth not in CLIENT_AUTH:
        raise _err(path, f"tls_server_config.client_auth_type {auth!r} is not one of {sorted(CLIENT_AUTH)}")
    ctx.verify_mode = CLIENT_AUTH[auth]
    ca, ca_text = tls.get("client_ca_file"), tls.get("client_ca")
    if ca and ca_text:
        raise _err(path, "tls_server_config: give client_ca_file or client_ca, not both")
    if (ca or ca_text) and ctx.verify_mode == ssl.CERT_NONE:
        # exporter-toolkit refuses this too: a CA without a policy would silently verify nothing.
        raise _err(path, "tls_server_config.client_ca_file (or client_ca) is set but client_auth_type is "
                         "NoClientCert; set client_auth_type: RequireAndVerifyClientCert")
    if ctx.verify_mode != ssl.CERT_NONE:
        if not ca and not ca_text:
            # Python's ssl cannot accept a client certificate without verifying it, so every mode
            # that asks for one verifies it against client_ca_file.
            raise _err(path, f"tls_server_config.client_auth_type {auth} needs client_ca_file "
                             "(the CA that signs client certificates) or client_ca (inline PEM)")
        try:
            if ca_text:
                ctx.load_verify_locations(cadata=str(ca_text))
            else:
                ctx.load_verify_locations(_resolve(base, ca))
        except ssl.SSLError as e:
            raise _err(path, f"tls_server_config.client_ca{'_file ' + _resolve(base, ca) if ca else ''}: "
                             f"not a PEM CA certificate: {e}") from e
        except OSError as e:
            raise _err(path, f"tls_server_config.client_ca_file: cannot read {_resolve(base, ca)}: "
                             f"{e.strerror}") from e
    suites = tls.get("cipher_suites") or []
    if suites:
        bad = [c for c in suites if c not in CIPHER_SUITES]
        if bad:
            raise _err(path, f"tls_server_config.cipher_suites: unknown {bad}; known (Go names): "
                             f"{sorted(CIPHER_SUITES)}")
        ctx.set_ciphers(":".join(CIPHER_SUITES[c] for c in suites))
    if tls.get("prefer_server_cipher_suites", True):
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    curves = tls.get("curve_preferences") or []
    bad = [c for c in curves if c not in CURVES]
    if bad:
        raise _err(path, f"tls_server_config.curve_preferences: unknown {bad}; known: {sorted(CURVES)}")
    if curves:
        # Python's ssl can pin one ECDH curve but not order several; OpenSSL's defaults cover all four.
        log.warning("--web.config.file %s: curve_preferences is accepted but OpenSSL's default "
                    "order is used", path)
    return ctx


def _version(v: Any, key: str, path: Path) -> ssl.TLSVersion:
    try:
        return TLS_VERSIONS[str(v)]
    except KeyError:
        raise _err(path, f"tls_server_config.{key} {v!r} is not one of {sorted(TLS_VERSIONS)}") from None


Signature = tuple[tuple[str, int, int, int], ...]


def _signature(files: tuple[Path, ...]) -> Signature:
    out = []
    for f in files:
        try:
            st = f.stat()  # follows symlinks: a Kubernetes secret update swaps the ..data link
            out.append((str(f), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(f), -1, -1, -1))
    return tuple(out)


class WebConfigSource:
    """The web config as it is now. Like exporter-toolkit, which re-reads the file for every
    connection, a change to the file or to a certificate, key or CA it names (cert-manager rotating
    a certificate in place) takes effect without a restart; here it is noticed by stat() at most
    once per ``interval``. An edit that does not load is logged and the last good config kept.
    Whether TLS is on at all is fixed at start, as in exporter-toolkit."""

    def __init__(self, path: str | Path, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._cfg = load(self.path)  # a bad file at start is an error, not a log line
        self._sig = _signature(self._cfg.files)
        self._bad: Signature | None = None
        self._interval = interval
        self._clock = clock
        self._next = clock() + interval
        self._lock = threading.Lock()

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self.current().ssl_context

    def reload(self) -> bool:
        """Re-read the file now, changed or not (SIGHUP). False when the new text does not load:
        the previous config stays in force, as for an edit noticed by stat()."""
        with self._lock:
            self._next = self._clock() + self._interval
            return self._load(_signature(self._cfg.files), forced=True)

    def current(self) -> WebConfig:
        if self._clock() < self._next:
            return self._cfg
        with self._lock:
            now = self._clock()
            if now < self._next:
                return self._cfg
            self._next = now + self._interval
            sig = _signature(self._cfg.files)
            if sig not in (self._sig, self._bad):
                self._load(sig)
            return self._cfg

    def _load(self, sig: Signature, forced: bool = False) -> bool:
        """Load the file (the caller holds the lock); True when the new config is in force."""
        why = " (SIGHUP)" if forced else ""
        try:
            new = load(self.path)
        except WebConfigError as e:
            # Logged once per broken state; a rotation that writes the certificate and then
            # the key passes through one such state and recovers at the next check.
            self._bad = sig
            log.error("%s%s; keeping the previous web config until the file is fixed", e, why)
            return False
        if (new.ssl_context is None) != (self._cfg.ssl_context is None):
            self._bad = sig
            log.error("--web.config.file %s: TLS cannot be switched %s while running; restart "
                      "pcietax; keeping the previous web config", self.path,
                      "on" if new.ssl_context else "off")
            return False
        self._cfg, self._sig, self._bad = new, _signature(new.files), None
        log.info("--web.config.file %s: reloaded%s", self.path, why)
        return True
