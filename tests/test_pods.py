"""Pod attribution from /proc/PID/cgroup and the kubelet's log directories (sources/pods.py).

The cgroup fixtures are the exact text the kernel writes for a process in each layout (cgroup v1
hybrid with its ``0::`` line, cgroup v2; kubelet systemd and cgroupfs drivers; containerd, CRI-O,
cri-dockerd; kind; a reader in its own cgroup namespace). The log trees are the kubelet's layout:
``/var/log/pods/<ns>_<pod>_<uid>/<container>/<n>.log`` and the
``/var/log/containers/<pod>_<ns>_<container>-<id>.log`` symlinks (absolute, into /var/log/pods,
as the kubelet makes them; the resolver only reads their names)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pcietax.sources import pods
from pcietax.sources.pods import PodRef, PodResolver, parse_cgroup

UID = "5f1b3c2a-8d4e-4f60-9a7b-1c2d3e4f5a6b"
UID_ = UID.replace("-", "_")
STATIC_UID = "0123456789abcdef0123456789abcdef"  # a static pod: the kubelet's config hash
APP = "a" * 63 + "1"
SIDE = "b" * 63 + "2"
SANDBOX = "c" * 63 + "3"


def v1_hybrid(path: str) -> bytes:
    """Debian 10 / RHEL 8 style: every v1 controller, name=systemd, and the empty unified line."""
    ctrls = ["cpuset", "cpu,cpuacct", "blkio", "memory", "devices", "freezer", "net_cls,net_prio",
             "perf_event", "hugetlb", "pids", "rdma"]
    lines = [f"{12 - i}:{c}:{path}" for i, c in enumerate(ctrls)]
    return ("\n".join([*lines, f"1:name=systemd:{path}", "0::/"]) + "\n").encode()


def v2(path: str) -> bytes:
    return f"0::{path}\n".encode()


LAYOUTS = {
    "containerd systemd v2 burstable": v2(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{APP}.scope"),
    "containerd systemd v2 guaranteed": v2(
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{APP}.scope"),
    "containerd systemd v1": v1_hybrid(
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"cri-containerd-{APP}.scope"),
    "containerd cgroupfs v1 besteffort": v1_hybrid(f"/kubepods/besteffort/pod{UID}/{APP}"),
    "containerd cgroupfs v2 guaranteed": v2(f"/kubepods/pod{UID}/{APP}"),
    "crio systemd v2": v2(
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{APP}.scope"),
    "crio systemd v1": v1_hybrid(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{APP}.scope"),
    "crio cgroupfs v1": v1_hybrid(f"/kubepods/burstable/pod{UID}/crio-{APP}"),
    "cri-dockerd systemd v2": v2(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{APP}.scope"),
    "kind (kubelet- prefix)": v2(
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{APP}.scope"),
    "read from the exporter's own cgroup namespace": v2(
        f"/../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{APP}.scope"),
    "a sub-cgroup made by the app (v2 nested)": v2(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{APP}.scope/worker"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_pod_uid_and_container_id(layout):
    assert parse_cgroup(LAYOUTS[layout]) == (UID, APP)


def test_static_pod_uid_is_32_hex():
    data = v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/"
              f"cri-containerd-{APP}.scope")
    assert parse_cgroup(data) == (STATIC_UID, APP)


@pytest.mark.parametrize("data", [
    v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),  # the pod's own
    v2(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
       f"crio-conmon-{APP}.scope"),  # CRI-O's container monitor
    v1_hybrid(f"/kubepods/besteffort/pod{UID}"),
], ids=["pod cgroup", "crio-conmon", "cgroupfs pod"])
def test_a_process_in_the_pod_but_no_container(data):
    assert parse_cgroup(data) == (UID, "")


def test_v1_line_with_the_container_wins_over_one_that_stops_at_the_pod():
    data = (f"4:memory:/kubepods/burstable/pod{UID}\n3:pids:/kubepods/burstable/pod{UID}/{APP}\n"
            f"0::/\n").encode()
    assert parse_cgroup(data) == (UID, APP)


@pytest.mark.parametrize("data", [
    b"",
    v2("/"),
    v2("/user.slice/user-1000.slice/session-2.scope"),
    v2("/system.slice/containerd.service"),
    v2(f"/system.slice/docker-{APP}.scope"),  # plain Docker: a container, but no pod
    v1_hybrid("/system.slice/ssh.service"),
    v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_[:-1]}.slice"),  # short uid
    v2(f"/kubepods.slice/notkubepods-burstable-pod{UID_}x.slice"),
    b"\xff\xfe\x00garbage\n0::\xff/kubepods\xfe\n",
    b"0::" + b"/a" * 100_000 + b"\n",
    b"\n" * 100_000,
], ids=["empty", "root", "user session", "service", "docker", "v1 service", "short uid", "lookalike",
        "binary", "huge path", "many lines"])
def test_not_a_kubernetes_pod(data):
    assert parse_cgroup(data) is None


def test_hostile_bytes_around_a_real_path_still_parse():
    data = b"\xff\xfe:\xc3(:junk\n" + v2(f"/kubepods/pod{UID}/{APP}") + b"9:\x80\x81:/\xff\n"
    assert parse_cgroup(data) == (UID, APP)


def test_input_is_capped():
    # A pod path after 64 KiB of padding is not looked at: real files are a few hundred bytes.
    data = b"5:x:/" + b"p" * pods.MAX_CGROUP_BYTES + b"\n" + v2(f"/kubepods/pod{UID}/{APP}")
    t0 = time.perf_counter()
    assert parse_cgroup(data) is None
    assert parse_cgroup(b"0::/" + b"kubepods-pod" * 1_000_000) is None
    assert time.perf_counter() - t0 < 5  # bounded work, not a timing target


# --- names from /var/log/pods -----------------------------------------------------------------


def make_pod(root, ns: str, pod: str, uid: str, containers: dict[str, str], links: bool = True) -> None:
    """The kubelet's layout: a pod directory, a directory per container with its log, and the
    /var/log/containers symlink per container ID."""
    d = root / "pods" / f"{ns}_{pod}_{uid}"
    for name, cid in containers.items():
        (d / name).mkdir(parents=True)
        (d / name / "0.log").write_text("2026-01-01T00:00:00.000000000Z stdout F started\n")
        if links:
            (root / "containers").mkdir(exist_ok=True)
            os.symlink(d / name / "0.log", root / "containers" / f"{pod}_{ns}_{name}-{cid}.log")


def cgroup_of(uid: str, cid: str) -> bytes:
    return v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}"
              f".slice/cri-containerd-{cid}.scope")


@pytest.fixture
def kubelet(tmp_path):
    make_pod(tmp_path, "inference", "vllm-7d9f8-abcde", UID, {"vllm": APP, "metrics-sidecar": SIDE})
    make_pod(tmp_path, "kube-system", "etcd-node-1", STATIC_UID, {"etcd": "d" * 64})
    return tmp_path


@pytest.mark.parametrize("layout", LAYOUTS)
def test_names_for_every_layout(kubelet, layout):
    r = PodResolver(kubelet / "pods")
    assert r.lookup(LAYOUTS[layout]) == PodRef("inference", "vllm-7d9f8-abcde", "vllm")


def test_each_container_of_a_pod_by_its_id(kubelet):
    r = PodResolver(kubelet / "pods")
    assert r.lookup(cgroup_of(UID, SIDE)) == PodRef("inference", "vllm-7d9f8-abcde", "metrics-sidecar")
    assert r.lookup(cgroup_of(STATIC_UID, "d" * 64)) == PodRef("kube-system", "etcd-node-1", "etcd")
    # The sandbox (pause) has an ID but no logs and no link: the pod, no container.
    assert r.lookup(cgroup_of(UID, SANDBOX)) == PodRef("inference", "vllm-7d9f8-abcde", "")
    assert r.lookup(v2(f"/kubepods/burstable/pod{UID}")) == PodRef("inference", "vllm-7d9f8-abcde", "")


def test_without_the_links_directory(tmp_path):
    make_pod(tmp_path, "a", "one", UID, {"only": APP}, links=False)
    make_pod(tmp_path, "b", "two", STATIC_UID, {"main": "d" * 64, "init-db": "e" * 64}, links=False)
    r = PodResolver(tmp_path / "pods")
    assert r.lookup(cgroup_of(UID, APP)) == PodRef("a", "one", "only")  # one container: it
    assert r.lookup(cgroup_of(STATIC_UID, "d" * 64)) == PodRef("b", "two", "")  # two: unknown


def test_outside_kubernetes_and_disabled(tmp_path, caplog):
    k8s = cgroup_of(UID, APP)
    assert PodResolver(None).lookup(k8s) is None
    with caplog.at_level("INFO", logger="pcietax"):
        r = PodResolver(tmp_path / "no-such-dir")
        assert r.lookup(k8s) is None
        assert r.lookup(k8s) is None
        assert r.lookup(v2("/user.slice")) is None
    said = [x for x in caplog.records if "pod labels: cannot read" in x.getMessage()]
    assert len(said) == 1


def test_a_pod_that_appears_later_is_found_after_the_rescan_interval(kubelet):
    now = [0.0]
    r = PodResolver(kubelet / "pods", clock=lambda: now[0])
    new_uid = "11111111-2222-4333-8444-555555555555"
    cg = cgroup_of(new_uid, "f" * 64)
    assert r.lookup(cg) is None  # not there yet; not cached as "not a pod"
    make_pod(kubelet, "batch", "job-x", new_uid, {"worker": "f" * 64})
    assert r.lookup(cg) is None  # listed less than RESCAN_INTERVAL ago
    now[0] += pods.RESCAN_INTERVAL
    assert r.lookup(cg) == PodRef("batch", "job-x", "worker")


def test_a_container_linked_later(kubelet):
    now = [0.0]
    r = PodResolver(kubelet / "pods", clock=lambda: now[0])
    late = "9" * 64
    assert r.lookup(cgroup_of(UID, late)) == PodRef("inference", "vllm-7d9f8-abcde", "")
    (kubelet / "pods" / f"inference_vllm-7d9f8-abcde_{UID}" / "loader").mkdir()
    os.symlink("/dev/null", kubelet / "containers" / f"vllm-7d9f8-abcde_inference_loader-{late}.log")
    now[0] += pods.RESCAN_INTERVAL
    assert r.lookup(cgroup_of(UID, late)) == PodRef("inference", "vllm-7d9f8-abcde", "loader")


def test_directory_names_are_hostile(tmp_path):
    d = tmp_path / "pods"
    d.mkdir()
    for bad in (b"ns_pod_" + UID.encode() + b"\xff", b"\xff\xfe_pod_" + UID.encode(),
                b"ns_po_d_" + UID.encode(), b"NS_pod_" + UID.encode(), b"ns_-pod_" + UID.encode(),
                b"ns_pod_not-a-uid", b"_" * 3, b"x" * 255):
        os.mkdir(os.fsencode(d) + b"/" + bad)
    (tmp_path / "containers").mkdir()
    for bad in (b"pod_ns_c\xff-" + APP.encode() + b".log", b"pod_ns_C-" + APP.encode() + b".log"):
        os.symlink("/dev/null", os.fsencode(tmp_path / "containers") + b"/" + bad)
    make_pod(tmp_path, "good", "pod", STATIC_UID, {"c": "d" * 64})
    r = PodResolver(d)
    assert r.lookup(cgroup_of(UID, APP)) is None  # every lookalike of UID's directory was refused
    assert r.lookup(cgroup_of(STATIC_UID, "d" * 64)) == PodRef("good", "pod", "c")


def test_caches_are_bounded_and_lookups_thread_safe(kubelet):
    r = PodResolver(kubelet / "pods")
    inputs = [v2(f"/user.slice/session-{i}.scope") for i in range(pods.CACHE_SIZE + 500)]
    errors: list[BaseException] = []

    def worker(chunk: list[bytes]) -> None:
        try:
            for data in chunk:
                assert r.lookup(data) is None
                assert r.lookup(cgroup_of(UID, APP)) == PodRef("inference", "vllm-7d9f8-abcde", "vllm")
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(inputs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(r._cache) <= pods.CACHE_SIZE


def test_listing_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(pods, "MAX_DIR_ENTRIES", 50)
    for i in range(200):
        (tmp_path / "pods" / f"ns_pod-{i}_{i:032x}").mkdir(parents=True)
    r = PodResolver(tmp_path / "pods")
    r.lookup(cgroup_of(f"{1:032x}", APP))
    assert len(r._by_uid) == 50
