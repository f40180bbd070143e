"""--web.config.file parsing (exporter-toolkit format): every bad config fails at load with a
message that names the flag, the field and the fix. Real PEM files from the openssl CLI."""

from __future__ import annotations

import ssl
from pathlib import Path

import bcrypt
import pytest
import yaml

from helpers.tlscerts import Pki, make_pki
from pcietax.webconfig import WebConfigError, load

HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path: Path, cfg: object, name: str = "web.yml") -> Path:
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return p


def tls(pki: Pki, **extra: object) -> dict[str, object]:
    return {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), **extra}


def test_full_config_loads(tmp_path, pki):
    cfg = load(write(tmp_path, {
        "tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert",
                                 client_ca_file=str(pki.ca), min_version="TLS12", max_version="TLS13",
                                 client_allowed_sans=["scraper.example"],
                                 cipher_suites=["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]),
        "http_server_config": {"headers": {"X-Frame-Options": "deny"}, "http2": True},
        "basic_auth_users": {"prom": HASH},
    }))
    assert cfg.ssl_context is not None
    assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert cfg.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert cfg.ssl_context.maximum_version == ssl.TLSVersion.TLSv1_3
    assert [c["name"] for c in cfg.ssl_context.get_ciphers() if c["protocol"] == "TLSv1.2"] == [
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    ]
    assert cfg.users == {"prom": HASH.encode()}
    assert cfg.headers == {"X-Frame-Options": "deny"}
    assert cfg.client_allowed_sans == {"scraper.example"}


def test_inline_pem_and_the_old_client_auth_name(tmp_path, pki):
    cfg = load(write(tmp_path, {"tls_server_config": {
        "cert": pki.server_cert.read_text(), "key": pki.server_key.read_text(),
        "client_ca": pki.ca.read_text(), "client_auth_type": "RequireClientCert"}}))
    assert cfg.ssl_context is not None and cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert len(cfg.ssl_context.get_ca_certs()) == 1
    # Only the config file itself is watched when everything is inline.
    assert cfg.files == (tmp_path / "web.yml",)


def test_files_lists_what_a_reload_must_watch(tmp_path, pki):
    path = write(tmp_path, {"tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert",
                                                     client_ca_file=str(pki.ca))})
    assert load(path).files == (path, pki.server_cert, pki.server_key, pki.ca)


def test_relative_paths_are_relative_to_the_config_file(tmp_path, pki):
    # The config lives next to the PEM files and names them bare, as exporter-toolkit allows.
    cfg = load(write(pki.dir, {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}},
                     name="rel.yml"))
    assert cfg.ssl_context is not None


@pytest.mark.parametrize("text", ["", "{}\n", "tls_server_config: {}\n", "basic_auth_users:\n"])
def test_empty_sections_mean_plain_http_without_auth(tmp_path, text):
    cfg = load(write(tmp_path, text))
    assert cfg.ssl_context is None and cfg.users == {} and cfg.headers == {}


def bad_cases(pki: Pki, tmp: Path) -> list[tuple[object, list[str]]]:
    """(config, words the error must contain). Each names the field and how to fix it."""
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return [
        ({"tls_server_config": tls(pki), "extra": 1}, ["unknown field", "'extra'", "allowed"]),
        ({"tls_server_config": tls(pki, cert_fil="x")}, ["unknown field", "'cert_fil'", "tls_server_config"]),
        ({"http_server_config": {"header": {}}}, ["unknown field", "'header'", "http_server_config"]),
        ({"tls_server_config": {"cert_file": str(pki.server_cert)}}, ["needs key_file", "key (inline"]),
        ({"tls_server_config": {"key_file": str(pki.server_key)}}, ["needs cert_file", "cert (inline"]),
        ({"tls_server_config": {"client_auth_type": "RequireAndVerifyClientCert"}}, ["needs cert_file"]),
        ({"tls_server_config": tls(pki, cert=pki.server_cert.read_text())}, ["cert_file or cert, not both"]),
        ({"tls_server_config": {"cert": "garbage", "key": "garbage"}}, ["not a matching PEM"]),
        ({"tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert",
                                   client_ca_file=str(pki.ca), client_ca=pki.ca.read_text())},
         ["client_ca_file or client_ca, not both"]),
        ({"tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert", client_ca="junk")},
         ["client_ca", "not a PEM CA"]),
        ({"tls_server_config": tls(pki, cert_file=str(tmp / "missing.crt"))},
         ["cert_file", "missing.crt", "No such file"]),
        ({"tls_server_config": tls(pki, key_file=str(pki.client_key))},
         ["cert_file", "key_file", "matching"]),
        ({"tls_server_config": tls(pki, cert_file=str(garbage))}, ["cert_file", "garbage.pem", "PEM"]),
        ({"tls_server_config": tls(pki, client_auth_type="RequireCert")},
         ["client_auth_type", "'RequireCert'", "RequireAndVerifyClientCert"]),
        ({"tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert")},
         ["client_auth_type", "needs client_ca_file"]),
        ({"tls_server_config": tls(pki, client_ca_file=str(pki.ca))},
         ["client_ca_file", "NoClientCert", "RequireAndVerifyClientCert"]),
        ({"tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert",
                                   client_ca_file=str(tmp / "nope.crt"))}, ["client_ca_file", "nope.crt"]),
        ({"tls_server_config": tls(pki, client_auth_type="RequireAndVerifyClientCert",
                                   client_ca_file=str(garbage))}, ["client_ca_file", "PEM"]),
        ({"tls_server_config": tls(pki, min_version="TLS1.2")}, ["min_version", "'TLS1.2'", "TLS12"]),
        ({"tls_server_config": tls(pki, max_version="SSL3")}, ["max_version", "'SSL3'", "TLS13"]),
        ({"tls_server_config": tls(pki, min_version="TLS13", max_version="TLS12")},
         ["max_version", "below min_version"]),
        ({"tls_server_config": tls(pki, cipher_suites=["RC4-MD5"])}, ["cipher_suites", "RC4-MD5"]),
        ({"tls_server_config": tls(pki, curve_preferences=["P-256"])}, ["curve_preferences", "CurveP256"]),
        ({"tls_server_config": tls(pki, client_allowed_sans=["a.example"])},
         ["client_allowed_sans", "RequireAndVerifyClientCert"]),
        ({"tls_server_config": "yes"}, ["tls_server_config must be a mapping"]),
        ({"http_server_config": 5}, ["http_server_config must be a mapping"]),
        ({"http_server_config": {"headers": ["X-A: b"]}}, ["http_server_config.headers must be a mapping"]),
        ({"http_server_config": {"headers": {"X-XSS-Protection": "0\r\nSet-Cookie: x"}}},
         ["headers.X-XSS-Protection", "one-line"]),
        ({"http_server_config": {"headers": {"Set-Cookie": "a=b"}}},
         ["'Set-Cookie' cannot be configured", "Strict-Transport-Security"]),
        ({"http_server_config": {"headers": {"X-Frame-Options": "allow"}}},
         ["headers.X-Frame-Options", "'allow'", "['deny', 'sameorigin']"]),
        ({"basic_auth_users": {"prom": "s3cret"}},
         ["basic_auth_users.prom", "not a bcrypt hash", "htpasswd"]),
        ({"basic_auth_users": {"prom": HASH[:-1]}}, ["basic_auth_users.prom", "not a bcrypt hash"]),
        ({"basic_auth_users": {"prom": "$2b$99$" + HASH[7:]}}, ["basic_auth_users.prom", "bcrypt"]),
        ({"basic_auth_users": {"a:b": HASH}}, ["'a:b'", "cannot contain ':'"]),
        ({"basic_auth_users": ["prom"]}, ["basic_auth_users must be a mapping"]),
        ("tls_server_config: [unclosed\n", ["not valid YAML"]),
        ("- just\n- a list\n", ["must be a mapping"]),
    ]


def test_every_bad_config_fails_with_the_field_and_the_fix(tmp_path, pki):
    for i, (cfg, words) in enumerate(bad_cases(pki, tmp_path)):
        path = write(tmp_path, cfg, name=f"bad{i}.yml")
        with pytest.raises(WebConfigError) as e:
            load(path)
        msg = str(e.value)
        assert msg.startswith(f"--web.config.file {path}: "), msg
        for w in words:
            assert w in msg, (cfg, msg)


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(WebConfigError, match=r"cannot read it: No such file"):
        load(tmp_path / "absent.yml")
    with pytest.raises(WebConfigError, match=r"cannot read it: Is a directory"):
        load(tmp_path)
    p = tmp_path / "latin1.yml"
    p.write_bytes(b"basic_auth_users:\n  caf\xe9: x\n")
    with pytest.raises(WebConfigError, match="not UTF-8"):
        load(p)
