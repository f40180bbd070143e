"""`pcietax workload` without the exporter: its CUDA runtime stand-in, its vLLM-compatible TTFT
feed, and its errors. (Its ground truth is checked against the real kernel in
test_ebpf_ground_truth.py.)"""

from __future__ import annotations

import ctypes
import json
import subprocess
import time
import urllib.request

import pytest

from conftest import free_port, pcietax_cmd, pcietax_env
from helpers.scrape import scrape, value
from pcietax.workload.cudart import D2H, H2D, Cudart, build_stub
from pcietax.workload.ttft import TTFT_BUCKETS

TTFT = "vllm:time_to_first_token_seconds"


def test_stub_moves_bytes_like_a_device_would(tmp_path):
    cuda = Cudart(str(build_stub(tmp_path)))
    n = 3 * (1 << 20) + 5  # more than the bounce buffer, not a multiple of 8
    src = (ctypes.c_ubyte * n).from_buffer_copy(bytes(i % 251 for i in range(n)))
    back = (ctypes.c_ubyte * n)()
    dev = cuda.malloc(n)
    pinned = cuda.host_alloc(n)
    try:
        cuda.memcpy_async(dev, ctypes.addressof(src), n, H2D)  # pageable: through the bounce buffer
        cuda.memcpy_async(pinned, dev, n, D2H)  # pinned: direct
        cuda.memcpy_async(ctypes.addressof(back), pinned, n, 0)
        cuda.sync()
    finally:
        cuda.free(dev)
        cuda.free_host(pinned)
    assert bytes(back) == bytes(src)


def test_stub_exports_the_symbols_the_probes_attach_to(tmp_path):
    lib = build_stub(tmp_path)
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    from pcietax.sources import cuda_libs

    for name in (*cuda_libs.RUNTIME_COPY, *cuda_libs.RUNTIME_ALLOC, *cuda_libs.RUNTIME_REGISTER,
                 *cuda_libs.RUNTIME_FREE):
        assert name in exported, name
    soname = subprocess.run(["objdump", "-p", str(lib)], capture_output=True, text=True).stdout
    assert "SONAME               libcudart.so.12" in soname


def test_ttft_histogram_is_vllm_shaped_and_follows_request_latency(tmp_path):
    port = free_port()
    p = subprocess.Popen(
        [*pcietax_cmd(), "workload", "--scenario", "pinned", "--bytes", "4MiB", "--chunk", "1MiB",
         "--request-delay", "0.3", "--duration", "30", "--metrics-address", f"127.0.0.1:{port}",
         "--model-name", "m1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=pcietax_env(PCIETAX_CACHE=str(tmp_path)))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert p.poll() is None, p.communicate()[1]
            try:
                s = scrape(url + "/metrics")
                if value(s, TTFT + "_count", model_name="m1") >= 5:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        with urllib.request.urlopen(url + "/ground-truth", timeout=10) as r:
            truth = json.loads(r.read())
    finally:
        p.terminate()
        p.wait(timeout=15)
    count = value(s, TTFT + "_count", model_name="m1")
    les = {float(dict(ls)["le"]) for (n, ls) in s if n == TTFT + "_bucket"}
    assert les == {*TTFT_BUCKETS, float("inf")}
    # every request took >= 0.3 s: none below the 0.25 bucket, all by 2.5 s
    assert value(s, TTFT + "_bucket", model_name="m1", le="0.25") == 0
    assert value(s, TTFT + "_bucket", model_name="m1", le="2.5") == count
    assert value(s, TTFT + "_sum", model_name="m1") >= 0.3 * count
    assert truth["requests"] >= 4 and truth["payload_bytes"]["ingress"] % (4 << 20) == 0


def _workload(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*pcietax_cmd(), "workload", *args], capture_output=True, text=True,
                          env=pcietax_env(**env), timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (["--bytes", "0"], "must be positive"),
    (["--bytes", "lots"], "is not a size"),
    (["--scenario", "rdma"], "invalid choice"),
])
def test_bad_flags_are_refused(args, message):
    r = _workload(*args)
    assert r.returncode == 2 and message in r.stderr


def test_missing_cuda_runtime_is_a_clear_error():
    r = _workload("--cudart", "/nonexistent/libcudart.so.12", "--bytes", "1MiB")
    assert r.returncode == 1 and "cannot load the CUDA runtime" in r.stderr


def test_stub_build_failure_shows_the_compiler_command(tmp_path):
    r = _workload("--bytes", "1MiB", PCIETAX_CACHE=str(tmp_path), CC="/bin/false")
    assert r.returncode == 1
    assert "building the CUDA runtime stand-in failed" in r.stderr and "/bin/false" in r.stderr


def test_unreachable_peer_is_a_clear_error(tmp_path):
    port = free_port()  # nothing listens there
    r = _workload("--bytes", "1MiB", "--peer", f"127.0.0.1:{port}", PCIETAX_CACHE=str(tmp_path))
    assert r.returncode == 1 and "Connection refused" in r.stderr


def test_stub_copy_functions_open_with_push_rbp_like_libcudart(tmp_path):
    """NVIDIA's cudaMemcpy/cudaMemcpyAsync open with `push %rbp`, which the kernel's uprobes emulate;
    the stand-in must too, or every probe hit is single-stepped at ~10x the cost (issue 10)."""
    from pcietax.sources.ebpf.elf import functions
    from pcietax.workload.cudart import DRIVER_SONAME, build_stub

    for driver in (False, True):
        lib = build_stub(tmp_path, driver=driver)
        copies = {"cudaMemcpy", "cudaMemcpyAsync", "cudaMemcpy_ptds", "cudaMemcpyAsync_ptsz"}
        fns = functions(str(lib), copies)
        assert len(fns) == 4
        for f in fns.values():
            assert f.site == "push", (lib, f)
            assert lib.read_bytes()[f.offset] == 0x55, f  # push %rbp itself
    drv = functions(str(lib.with_name(DRIVER_SONAME)), {"cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2"})
    assert {f.site for f in drv.values()} == {"push"}
