"""``--web.config.file`` in the Prometheus exporter-toolkit format: TLS, client certificates,
basic auth with bcrypt hashes, extra response headers. Unknown keys are an error (as in
exporter-toolkit), and relative paths are relative to the file itself."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class WebConfigError(ValueError):
    pass


CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
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
    "cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
    "cipher_suites", "curve_preferences", "prefer_server_cipher_suites", "client_allowed_sans",
}
_HTTP_KEYS = {"http2", "headers"}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}


@dataclass
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    headers: dict[str, str] = field(default_factory=dict)


def _check_keys(section: str, got: dict[str, Any], allowed: set[str], path: Path) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise WebConfigError(
            f"{path}: unknown field(s) {unknown} in {section or 'top level'}; allowed: {sorted(allowed)}"
        )


def load(path: str | Path) -> WebConfig:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise WebConfigError(f"--web.config.file: cannot read {p}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise WebConfigError(f"--web.config.file: {p} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise WebConfigError(f"--web.config.file: {p} must be a YAML mapping")
    _check_keys("", raw, _TOP_KEYS, p)
    cfg = WebConfig()
    tls = raw.get("tls_server_config")
    if tls:
        if not isinstance(tls, dict):
            raise WebConfigError(f"{p}: tls_server_config must be a mapping")
        _check_keys("tls_server_config", tls, _TLS_KEYS, p)
        cfg.ssl_context = _ssl_context(tls, p.parent, p)
    http = raw.get("http_server_config") or {}
    _check_keys("http_server_config", http, _HTTP_KEYS, p)
    cfg.headers = {str(k): str(v) for k, v in (http.get("headers") or {}).items()}
    users = raw.get("basic_auth_users") or {}
    if not isinstance(users, dict):
        raise WebConfigError(f"{p}: basic_auth_users must map user names to bcrypt hashes")
    for user, h in users.items():
        hs = str(h)
        if not hs.startswith(("$2a$", "$2b$", "$2y$")):
            raise WebConfigError(
                f"{p}: basic_auth_users.{user} is not a bcrypt hash; make one with "
                "`htpasswd -nBC 10 \"\" | tr -d ':\\n'` or python3 -c 'import bcrypt; "
                "print(bcrypt.hashpw(b\"secret\", bcrypt.gensalt()).decode())'"
            )
        cfg.users[str(user)] = hs.encode()
    return cfg


def _resolve(base: Path, value: Any) -> str:
    q = Path(str(value))
    return str(q if q.is_absolute() else base / q)


def _ssl_context(tls: dict[str, Any], base: Path, path: Path) -> ssl.SSLContext:
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise WebConfigError(f"{path}: tls_server_config needs both cert_file and key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(_resolve(base, tls["cert_file"]), _resolve(base, tls["key_file"]))
    except (OSError, ssl.SSLError) as e:
        raise WebConfigError(f"{path}: cannot load cert_file/key_file: {e}") from e
    ctx.minimum_version = _version(tls.get("min_version", "TLS12"), "min_version", path)
    if "max_version" in tls:
        ctx.maximum_version = _version(tls["max_version"], "max_version", path)
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in CLIENT_AUTH:
        raise WebConfigError(f"{path}: client_auth_type {auth!r} is not one of {sorted(CLIENT_AUTH)}")
    ctx.verify_mode = CLIENT_AUTH[auth]
    if ctx.verify_mode != ssl.CERT_NONE:
        ca = tls.get("client_ca_file")
        if not ca:
            raise WebConfigError(f"{path}: client_auth_type {auth} needs client_ca_file")
        try:
            ctx.load_verify_locations(_resolve(base, ca))
        except (OSError, ssl.SSLError) as e:
            raise WebConfigError(f"{path}: cannot load client_ca_file: {e}") from e
    return ctx


def _version(v: Any, key: str, path: Path) -> ssl.TLSVersion:
    try:
        return TLS_VERSIONS[str(v)]
    except KeyError:
        raise WebConfigError(f"{path}: {key} {v!r} is not one of {sorted(TLS_VERSIONS)}") from None
