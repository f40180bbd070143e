"""`pip install .` works: the wheel built from this tree installs into a fresh venv (Debian's
/usr/bin/python3, --system-site-packages, as scripts/setup.sh makes it), its `pcietax` console
script serves and calculates, and every file under ebpf/ is inside the wheel.

Offline-friendly: the wheel is built with --no-build-isolation when hatchling is importable and
installed with --no-deps; the runtime dependencies come from the test venv's site-packages through
a .pth file, and the test checks that pcietax itself is imported from the fresh venv."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.slow


def tree_files() -> list[str]:
    """Files a clean clone plus the work in progress would have (tracked + untracked, not ignored)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know which files belong to the tree")
    files = tree_files()
    if "README.md" not in files:
        pytest.skip("README.md (pyproject's readme, written by the integrator) is not in this tree yet")
    src = tmp_path_factory.mktemp("src")
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    dist = tmp_path_factory.mktemp("dist")
    # Offline when the build backend is already here; otherwise pip fetches hatchling into an
    # isolated build env, exactly as `pip install .` in scripts/setup.sh does.
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                        "--disable-pip-version-check", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = dist.glob("pcietax-*.whl")
    return whl


def test_checkout_finds_the_repository_ebpf_dir():
    from pcietax.bpfsrc import bpf_dir

    assert bpf_dir() == REPO / "ebpf"


def test_wheel_ships_every_ebpf_file_and_the_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    ebpf = [f for f in tree_files() if f.startswith("ebpf/")]
    assert ebpf, "ebpf/ is empty: it must hold at least its README.md"
    missing = [f for f in ebpf if f"pcietax/{f}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    py = [f for f in tree_files() if f.startswith("exporter/pcietax/") and f.endswith(".py")]
    missing = [f for f in py if f.removeprefix("exporter/") not in names]
    assert not missing, f"modules not in the wheel: {missing}"
    # Tests, scripts and the checkout layout stay out of the wheel.
    assert not [n for n in names if n.startswith(("tests/", "exporter/", "scripts/"))]
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pcietax = pcietax.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs the distribution's /usr/bin/python3")
    v = tmp_path_factory.mktemp("venv")
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(v)], check=True,
                   timeout=300)
    py = v / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The runtime deps (prometheus-client, bcrypt, PyYAML) from the venv running the tests.
    Path(purelib, "pcietax-test-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --ignore-installed: the test venv may hold pcietax itself (scripts/setup.sh installs it there),
    # and through the .pth pip would call the wheel "already satisfied" and install nothing.
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                        "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return v


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_installed_package_is_the_wheel_and_finds_its_bpf_sources(venv, tmp_path):
    code = ("import json, pcietax, pcietax.bpfsrc as b; "
            "print(json.dumps({'file': pcietax.__file__, 'bpf': str(b.bpf_dir()), "
            "'readme': b.bpf_source('README.md')[:8]}))")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=tmp_path, env=clean_env(),
                       capture_output=True, text=True, check=True, timeout=60)
    got = json.loads(r.stdout)
    assert Path(got["file"]).resolve().is_relative_to(venv.resolve()), got
    assert Path(got["bpf"]).resolve().is_relative_to(venv.resolve()), got
    assert got["readme"] == "# ebpf/\n"


def test_console_script_calc(venv, tmp_path):
    r = subprocess.run([str(venv / "bin" / "pcietax"), "calc", "--gen", "5", "--width", "16", "--json"],
                       cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["raw_gbps"] == 64.0 and 55 < got["usable_gbps"] < 56
    r = subprocess.run([str(venv / "bin" / "pcietax"), "calc", "--gen", "9", "--width", "16"],
                       cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--gen must be one of" in r.stderr


def test_console_script_serve(venv, tmp_path):
    port = free_port()
    p = subprocess.Popen([str(venv / "bin" / "pcietax"), "serve", f"--web.listen-address=127.0.0.1:{port}"],
                         cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline, body = time.monotonic() + 60, b""
        while time.monotonic() < deadline and not body:
            assert p.poll() is None, p.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    body = resp.read()
            except OSError:
                time.sleep(0.3)
        assert b"pcietax_build_info{" in body and b'pcietax_source_up{source="procfs"} 1.0' in body
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
