"""A throwaway PKI made with the real `openssl` CLI: a CA, a server certificate for localhost /
127.0.0.1, two client certificates with different SANs signed by that CA, and a client certificate
signed by a second, untrusted CA. EC P-256 keys keep generation fast on a 2-core CI machine."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # SAN DNS:scraper.example, signed by ca
    client_key: Path
    other_client_cert: Path  # SAN DNS:intruder.example, signed by ca
    other_client_key: Path
    rogue_cert: Path  # SAN DNS:scraper.example, signed by an untrusted CA
    rogue_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "3", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str, usage: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(
        f"subjectAltName={san}\nextendedKeyUsage={usage}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
    )
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "3", "-extfile", f"{name}.ext", cwd=d)


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    _leaf(d, "server", "ca", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    _leaf(d, "client", "ca", "DNS:scraper.example", "clientAuth")
    _leaf(d, "other", "ca", "DNS:intruder.example", "clientAuth")
    _leaf(d, "rogue", "rogue-ca", "DNS:scraper.example", "clientAuth")
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
               d / "other.crt", d / "other.key", d / "rogue.crt", d / "rogue.key")
