"""`pcietax serve` as a process: every bad flag or web config exits 2 with a message naming the flag
and the fix, before anything is served; a good TLS + basic-auth config serves HTTPS and shuts down
cleanly on SIGTERM without a traceback for rejected clients."""

from __future__ import annotations

import base64
import http.client
import os
import signal
import socket
import ssl
import subprocess
import time

import bcrypt
import pytest

from conftest import free_port, pcietax_cmd, pcietax_env
from helpers.tlscerts import make_pki


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*pcietax_cmd(), "serve", *args], env=pcietax_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def bad_flag_cases(tmp, busy: int) -> list[tuple[list[str], list[str]]]:
    bad_yaml = tmp / "bad.yml"
    bad_yaml.write_text("tls_server_config:\n  cert_file: x\n  keyfile: y\n")
    return [
        (["--web.listen-address", "127.0.0.1"], ["--web.listen-address", "[HOST]:PORT"]),
        (["--web.listen-address", ":99999"], ["--web.listen-address", "[HOST]:PORT"]),
        (["--web.listen-address", f"127.0.0.1:{busy}"], ["cannot listen", "--web.listen-address"]),
        (["--web.listen-address", "no-such-host.invalid:9817"], ["cannot listen", "--web.listen-address"]),
        (["--target.comm", "python("], ["--target.comm", "not a valid regex"]),
        (["--ratio.window", "0"], ["--ratio.window", "must be positive"]),
        (["--ratio.window", "10x"], ["--ratio.window", "not a duration"]),
        (["--collect.interval=-1s"], ["--collect.interval", "not a duration"]),
        (["--cuda.probes", "sometimes"], ["--cuda.probes", "invalid choice"]),
        (["--target.pid", "abc"], ["--target.pid", "invalid int"]),
        (["--log.level", "loud"], ["--log.level", "invalid choice"]),
        (["--no-such-flag"], ["unrecognized arguments", "--no-such-flag"]),
        (["--web.config.file", str(tmp / "absent.yml")], ["--web.config.file", "absent.yml", "cannot read"]),
        (["--web.config.file", str(bad_yaml)], ["--web.config.file", "unknown field", "'keyfile'"]),
    ]


def test_bad_flags_exit_2_naming_the_flag(tmp_path, busy_port):
    for args, words in bad_flag_cases(tmp_path, busy_port):
        r = serve("--web.listen-address", "127.0.0.1:0", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        for w in words:
            assert w in r.stderr, (args, w, r.stderr)


def wait_https(port: int, ctx: ssl.SSLContext, headers: dict[str, str], proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
            conn.request("GET", "/metrics", headers=headers)
            status = conn.getresponse().status
            conn.close()
            if status != 503:  # 503: the first collection cycle is still running
                return status
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("pcietax serve never answered over HTTPS")


def test_serve_tls_and_basic_auth_then_sigterm(tmp_path):
    pki = make_pki(tmp_path / "pki")
    pw = "pcietax-e2e"
    h = bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()
    cfg = tmp_path / "web.yml"
    cfg.write_text(f"tls_server_config:\n  cert_file: {pki.server_cert}\n  key_file: {pki.server_key}\n"
                   f"basic_auth_users:\n  prom: '{h}'\n")
    port = free_port()
    proc = subprocess.Popen(
        [*pcietax_cmd(), "serve", f"--web.listen-address=127.0.0.1:{port}", f"--web.config.file={cfg}"],
        env=pcietax_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        auth = {"Authorization": "Basic " + base64.b64encode(f"prom:{pw}".encode()).decode()}
        assert wait_https(port, ctx, auth, proc) == 200
        assert wait_https(port, ctx, {}, proc) == 401
        # A plain-HTTP client on the TLS port and a client that distrusts the CA.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            s.recv(100)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(),
                                           timeout=10)
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("GET", "/metrics", headers=auth)
        conn.close()
        assert wait_https(port, ctx, auth, proc) == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "listening on 127.0.0.1" in err and "(TLS)" in err
    assert "Traceback" not in err, err


def test_unreadable_web_config_exits_2(tmp_path):
    """Permission denied, for real: root reads anything, so as root the exporter runs as nobody."""
    cfg = tmp_path / "web.yml"
    cfg.write_text("basic_auth_users: {}\n")
    cfg.chmod(0)
    tmp_path.chmod(0o755)
    as_user: dict[str, int] = {}
    if os.geteuid() == 0:
        as_user = {"user": 65534, "group": 65534}
        probe = subprocess.run([*pcietax_cmd(), "--version"], env=pcietax_env(), capture_output=True,
                               timeout=60, **as_user)
        if probe.returncode:
            pytest.skip("this checkout is not readable by nobody, so permissions cannot be tested as root")
    r = subprocess.run([*pcietax_cmd(), "serve", "--web.listen-address=127.0.0.1:0",
                        f"--web.config.file={cfg}"], env=pcietax_env(), capture_output=True, text=True,
                       timeout=60, **as_user)
    assert r.returncode == 2, r.stderr
    assert f"--web.config.file {cfg}: cannot read it: Permission denied" in r.stderr
