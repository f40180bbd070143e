#!/usr/bin/env python3
"""Recount pcietax's host sources against test data no one on this team wrote (issue 11): the
fixture trees of prometheus/node_exporter (collector/fixtures: sys.ttar and proc/) and
prometheus/procfs (testdata/fixtures.ttar), compared value by value with what node_exporter
reports on the same trees: Debian's ``prometheus-node-exporter`` run on them here, and
node_exporter's committed end-to-end output (collector/fixtures/e2e-output.txt, the upstream
binary on its own fixtures).

The trees are extracted to a temporary directory (never vendored); each of pcietax's host sources
(netdev, rdma, procfs, pcie, topology) is started and read once on each tree, in process. Every
value that both report is compared, plus every series one side has and the other lacks within the
families compared, and whether each source read its files without a fault where node_exporter's
collector succeeded. Prints each comparison that disagrees, with the reason where it is known
and by design, then agreed/total.

    git --git-dir=... fetches: the ``fetch`` tool gives bare git dirs; a checkout works too.
    .venv/bin/python bench/upstream_recount.py --node-exporter /work/.mirror/prometheus+node_exporter/repo \\
        --procfs /work/.mirror/prometheus+procfs/repo [--keep DIR] [--json]

Mapping (node_exporter -> pcietax):
  node_infiniband_port_data_{received,transmitted}_bytes_total{device,port}
      -> pcietax_rdma_port_{receive,transmit}_bytes_total{device,port}
  node_network_{receive,transmit}_bytes_total{device}, for netdevs with a sysfs ``device`` link
      -> pcietax_nic_{receive,transmit}_bytes_total{nic} (plus RDMA port bytes of a RoCE NIC on
      the same PCI function; port bytes only for InfiniBand)
  sum over cpu of node_interrupts_total{type} -> pcietax_hardirq_total{irq}; its ``devices``
      (numbered lines) or ``info`` (named lines) -> the ``name`` label, where pcietax leaves out the
      hwirq/flow and trigger words that modern kernels print before the action names
  sum over cpu of node_softirqs_functions_total{type} (e2e only) -> pcietax_softirq_total{vector}
  sum over cpu of node_cpu_seconds_total{mode=irq|softirq}
      -> pcietax_staging_cpu_seconds_total{kind=irq_coarse|softirq_coarse}
  node_pcidevice_{current,max}_link_{transfers_per_second / 1e9, width} (e2e only), for GPU and
      NIC functions -> pcietax_pcie_link_{speed_gts,width}{state=current|max}
  node_scrape_collector_success{collector} -> the source started and read without a fault
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


class _Names:
    """The family names compared (DESIGN.md section 2), from the catalog of the package under test.
    Packages from before the catalog (``--ref`` of an older tree) spell the same contract names."""

    RDMA_PORT_RECEIVE_BYTES = "pcietax_rdma_port_receive_bytes_total"
    RDMA_PORT_TRANSMIT_BYTES = "pcietax_rdma_port_transmit_bytes_total"
    NIC_RECEIVE_BYTES = "pcietax_nic_receive_bytes_total"
    NIC_TRANSMIT_BYTES = "pcietax_nic_transmit_bytes_total"
    HARDIRQ = "pcietax_hardirq_total"
    SOFTIRQ = "pcietax_softirq_total"
    STAGING_CPU_SECONDS = "pcietax_staging_cpu_seconds_total"
    PCIE_LINK_SPEED_GTS = "pcietax_pcie_link_speed_gts"
    PCIE_LINK_WIDTH = "pcietax_pcie_link_width"


c = _Names
_SOURCES: list = []


def load_package(exporter_dir: Path) -> None:
    """Import pcietax from ``exporter_dir`` (this tree's, or an exported older ref's)."""
    global c
    sys.path.insert(0, str(exporter_dir))
    from pcietax.sources.netdev import NetdevSource
    from pcietax.sources.pcie import PcieSource
    from pcietax.sources.procfs import ProcfsSource
    from pcietax.sources.rdma import RdmaSource
    from pcietax.sources.topology import TopologySource
    try:
        from pcietax import catalog
    except ImportError:
        catalog = None
    if catalog is not None and hasattr(catalog, "HARDIRQ"):
        for k in vars(_Names):
            if k.isupper():
                assert getattr(catalog, k) == getattr(_Names, k), k
        c = catalog
    _SOURCES[:] = [NetdevSource, RdmaSource, ProcfsSource, PcieSource, TopologySource]


NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
USER_HZ = 100  # node_exporter's fixed USER_HZ; pcietax takes it from sysconf, which is 100 on Linux
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]
Key = tuple[tuple[str, str], ...]

# --- the upstream trees ------------------------------------------------------------------------

_EOF = re.compile(r"[^\\]EOF")


def ttar_extract(text: str, dest: Path) -> int:
    """Extract a ttar archive (prometheus/procfs's ``ttar`` script format: ``Directory:``,
    ``Path:`` + ``Lines: N`` + N lines, ``SymlinkTo:``, ``Mode:``; a line ending in an unescaped
    ``EOF`` has no newline; ``NULLBYTE`` is a NUL). ``text`` must be decoded without newline
    translation (binary files such as PCI ``config`` hold CRs). Returns the number of entries written."""
    lines = text.split("\n")
    i, path, n_entries = 0, "", 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("Path: "):
            path = line[6:]
        elif line.startswith("Directory: "):
            path = line[11:]
            _inside(dest, path).mkdir(parents=True, exist_ok=True)
            n_entries += 1
        elif line.startswith("Lines: "):
            n = int(line[7:])
            body = []
            for raw in lines[i:i + n]:
                no_newline = _EOF.search(raw) is not None
                raw = re.sub(r"(?<!\\)NULLBYTE", "\x00", raw).replace("\\NULLBYTE", "NULLBYTE")
                raw = re.sub(r"([^\\])EOF", r"\1", raw).replace("\\EOF", "EOF")
                body.append(raw if no_newline else raw + "\n")
            i += n
            target = _inside(dest, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes("".join(body).encode("utf-8", errors="surrogateescape"))
            n_entries += 1
        elif line.startswith("SymlinkTo: "):
            target = _inside(dest, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(line[11:])
            n_entries += 1
        elif line.startswith("Mode: "):
            target = _inside(dest, path)
            if not target.is_symlink():
                # Keep the owner able to read and list: the trees are read as this user.
                os.chmod(target, int(line[6:], 8) | (0o500 if target.is_dir() else 0o400))
        elif line and not line.startswith("#"):
            raise ValueError(f"ttar line {i}: unknown keyword {line[:40]!r}")
    return n_entries


def _inside(dest: Path, rel: str) -> Path:
    p = (dest / rel).resolve(strict=False) if ".." in rel.split("/") else dest / rel
    if dest.resolve() not in (p.resolve(strict=False), *p.resolve(strict=False).parents):
        raise ValueError(f"ttar path outside the tree: {rel!r}")
    return p


def _git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={repo}", *args], check=True, capture_output=True).stdout


def _gitdir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def upstream_file(repo: Path, path: str) -> str:
    if (repo / path).is_file():
        return (repo / path).read_text(errors="surrogateescape")
    return _git(_gitdir(repo), "show", f"HEAD:{path}").decode(errors="surrogateescape")


def upstream_dir(repo: Path, path: str, dest: Path) -> None:
    """``path`` (a directory of the repository) copied to ``dest``, symlinks kept."""
    if (repo / path).is_dir():
        shutil.copytree(repo / path, dest, symlinks=True)
        return
    data = _git(_gitdir(repo), "archive", "--format=tar", "HEAD", path)
    strip = len(Path(path).parts)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            parts = Path(m.name).parts[strip:]
            if not parts:
                continue
            if ".." in parts or not (m.isfile() or m.isdir() or m.issym()):
                raise ValueError(f"unexpected member in {path}: {m.name!r}")
            m.name = str(Path(*parts))
            tf.extract(m, dest)  # names checked above (Python 3.11.2 has no extraction filter)


def head_of(repo: Path) -> str:
    try:
        return _git(_gitdir(repo), "rev-parse", "HEAD").decode().strip()[:12]
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "checkout"


@dataclass
class Tree:
    name: str
    root: Path
    references: dict[str, Series]  # reference name -> node_exporter's series on this tree
    collector_ok: dict[str, dict[str, bool]]  # reference -> collector -> succeeded


def build_trees(ne_repo: Path, pf_repo: Path, work: Path) -> list[tuple[str, Path]]:
    ne = work / "node_exporter"
    (ne / "sys").parent.mkdir(parents=True, exist_ok=True)
    ttar_extract(upstream_file(ne_repo, "collector/fixtures/sys.ttar"), ne)
    upstream_dir(ne_repo, "collector/fixtures/proc", ne / "proc")
    # The arm64 /proc/interrupts upstream keeps beside the x86 one (node_exporter issue 2557).
    arm = work / "node_exporter_arm64"
    shutil.copytree(ne, arm, symlinks=True)
    shutil.copyfile(ne / "proc/interrupts_aarch64", arm / "proc/interrupts")
    pf = work / "procfs"
    ttar_extract(upstream_file(pf_repo, "testdata/fixtures.ttar"), pf)
    return [("node_exporter", ne), ("node_exporter_arm64", arm), ("procfs", pf / "fixtures")]


# --- the two sides -----------------------------------------------------------------------------


def parse_exposition(text: str) -> Series:
    out: Series = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_node_exporter(root: Path) -> Series:
    """Debian's node_exporter on a tree: the collectors pcietax's host sources overlap with."""
    port = _free_port()
    # --no-collector.netdev.netlink: 1.5 reads rtnetlink by default, which ignores --path.procfs.
    argv = [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}", f"--path.sysfs={root / 'sys'}",
            f"--path.procfs={root / 'proc'}", "--collector.disable-defaults", "--no-collector.netdev.netlink",
            "--collector.infiniband", "--collector.interrupts", "--collector.netdev", "--collector.stat",
            "--collector.cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return parse_exposition(r.read().decode())
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node_exporter did not answer on {root}") from None
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Ours:
    values: Series
    status: dict[str, str]  # source -> "ok", "absent: ...", "unavailable: ..."
    faults: dict[str, list[str]]


def run_pcietax(root: Path) -> Ours:
    sysfs, procfs = str(root / "sys"), str(root / "proc")
    netdev, rdma, procfs_source, pcie, topology = _SOURCES
    sources = [netdev(procfs, sysfs), rdma(sysfs), procfs_source(procfs, user_hz=USER_HZ), pcie(sysfs),
               topology(sysfs)]
    out = Ours({}, {}, {})
    for s in sources:
        try:
            s.start()
            snap = s.read()
        except Exception as e:  # a source that fails is a finding, not a crash
            kind = "absent" if type(e).__name__ == "SourceAbsent" else "unavailable"
            out.status[s.name] = f"{kind}: {e}"
            out.faults[s.name] = []
            continue
        finally:
            s.close()
        out.status[s.name] = "ok"
        out.faults[s.name] = [str(f) for f in snap.faults]
        for smp in (*snap.counters, *snap.gauges):
            out.values[(smp.family, smp.labels)] = smp.value
    return out


# --- comparisons -------------------------------------------------------------------------------


@dataclass
class Check:
    tree: str
    reference: str
    what: str  # family pair or "source"
    key: str
    ours: object
    theirs: object
    agree: bool
    reason: str = ""  # why they differ, where it is by design or the fixture's own


def _select(series: Series, name: str) -> dict[Key, float]:
    return {lb: v for (n, lb), v in series.items() if n == name}


def _sum_by(series: Series, name: str, label: str, where: Callable[[dict], bool] = lambda d: True
            ) -> dict[str, float]:
    out: dict[str, float] = {}
    for lb, v in _select(series, name).items():
        d = dict(lb)
        if where(d):
            out[d[label]] = out.get(d[label], 0.0) + v
    return out


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def _pairs(tree: str, ref: str, what: str, ours: dict[str, float], theirs: dict[str, float],
           reasons: Callable[[str, float | None, float | None], str] = lambda k, a, b: "") -> list[Check]:
    out = []
    for k in sorted(set(ours) | set(theirs)):
        a, b = ours.get(k), theirs.get(k)
        ok = _same(a, b)
        out.append(Check(tree, ref, what, k, a, b, ok, "" if ok else reasons(k, a, b)))
    return out


def _by_port(series: Series, name: str) -> dict[str, float]:
    out = {}
    for lb, v in _select(series, name).items():
        d = dict(lb)
        out[f"{d['device']}/{d['port']}"] = v
    return out


def compare_rdma(tree: str, ref: str, ne: Series, pt: Series) -> list[Check]:
    out = []
    for ne_name, pt_name in (
            ("node_infiniband_port_data_received_bytes_total", c.RDMA_PORT_RECEIVE_BYTES),
            ("node_infiniband_port_data_transmitted_bytes_total", c.RDMA_PORT_TRANSMIT_BYTES)):
        out += _pairs(tree, ref, f"{ne_name} -> {pt_name}", _by_port(pt, pt_name), _by_port(ne, ne_name))
    return out


def _pci_of(entry: Path) -> str:
    dev = entry / "device"
    return os.path.basename(os.path.realpath(dev)) if dev.exists() else ""


def compare_netdev(tree: str, ref: str, root: Path, ne: Series, pt: Series) -> list[Check]:
    """pcietax counts each physical NIC once: netdev bytes, plus RDMA port bytes on the same PCI
    function (RoCE), or port bytes only (InfiniBand). The expectation is built from node_exporter's
    netdev and infiniband series and sysfs links, independently of pcietax's code."""
    sysfs = root / "sys"
    net = sysfs / "class/net"
    physical = {i: _pci_of(net / i) for i in (os.listdir(net) if net.is_dir() else [])}
    physical = {i: p for i, p in physical.items() if p}
    ib = sysfs / "class/infiniband"
    rdma_pci = {d: _pci_of(ib / d) for d in (os.listdir(ib) if ib.is_dir() else [])}
    out = []
    for i, (ne_name, port_name, pt_name) in enumerate((
            ("node_network_receive_bytes_total", "node_infiniband_port_data_received_bytes_total",
             c.NIC_RECEIVE_BYTES),
            ("node_network_transmit_bytes_total", "node_infiniband_port_data_transmitted_bytes_total",
             c.NIC_TRANSMIT_BYTES))):
        del i
        netdev = {dict(lb)["device"]: v for lb, v in _select(ne, ne_name).items()}
        ports: dict[str, list[tuple[str, float]]] = {}
        for lb, v in _select(ne, port_name).items():
            d = dict(lb)
            pci = rdma_pci.get(d["device"], "")
            if pci:
                ll_path = ib / d["device"] / "ports" / d["port"] / "link_layer"
                ll = ll_path.read_text().strip() if ll_path.exists() else "InfiniBand"
                ports.setdefault(pci, []).append((ll, v))
        want: dict[str, float] = {}
        for iface, pci in physical.items():
            if iface not in netdev:
                continue
            p = ports.get(pci, [])
            if p and all(ll == "InfiniBand" for ll, _ in p):
                want[iface] = sum(v for _, v in p)
            else:
                want[iface] = netdev[iface] + sum(v for _, v in p)
        ours = {dict(lb)["nic"]: v for lb, v in _select(pt, pt_name).items()}
        out += _pairs(tree, ref, f"{ne_name} -> {pt_name}", ours, want)
    return out


_HWIRQ_WORD = re.compile(r"(?:\d+|0x[0-9a-fA-F]+)(?:-[\w.]+)?|-[\w.]+|Level|Edge")


def _name_agrees(irq: str, ours: str, info: str, devices: str) -> bool:
    if not irq.isdigit():
        return ours == info
    # Modern kernels print "<hwirq>-<flow>" (and arm64 "Level"/"Edge") between the chip and the
    # action names: node_exporter keeps them in ``devices``, pcietax's ``name`` is the names only.
    words = devices.split()
    while words and _HWIRQ_WORD.fullmatch(words[0]):
        words.pop(0)
    return ours.split() == words


def ported_interrupts(root: Path) -> Series:
    """node_exporter's parseInterrupts (collector/interrupts_linux.go at upstream HEAD, which reads
    arm64's glued ``IPI0:2768808080`` that 1.5 fails on), ported line for line: the reference for
    a tree where no node_exporter binary here can read the file."""
    lines = (root / "proc/interrupts").read_text().splitlines()
    ncpu = len(lines[0].split())
    out: Series = {}
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if len(parts) < ncpu + 1:
            continue  # "we ignore ERR and MIS for now"
        name = name.lstrip(" ")
        if name.isdigit():
            info, devices = parts[ncpu], " ".join(parts[ncpu + 1:])
        else:
            info, devices = " ".join(parts[ncpu:]), ""
        for cpu, v in enumerate(parts[:ncpu]):
            key = tuple(sorted({"cpu": str(cpu), "type": name, "info": info, "devices": devices}.items()))
            out[("node_interrupts_total", key)] = float(v)
    out[("node_scrape_collector_success", (("collector", "interrupts"),))] = 1.0
    return out


def compare_interrupts(tree: str, ref: str, ne: Series, pt: Series) -> list[Check]:
    theirs = _sum_by(ne, "node_interrupts_total", "type")
    ours = {dict(lb)["irq"]: v for lb, v in _select(pt, c.HARDIRQ).items()}

    def why(k: str, a, b) -> str:
        if b is None and k in ("ERR", "MIS", "Err"):
            return ("node_exporter skips lines with one node-wide number (ERR, MIS, arm64 Err); "
                    "pcietax keeps them: spurious and missed interrupts are a NIC-health signal")
        return ""

    out = _pairs(tree, ref, f"node_interrupts_total (sum over cpu) -> {c.HARDIRQ}", ours, theirs, why)
    info = {}
    for lb in _select(ne, "node_interrupts_total"):
        d = dict(lb)
        info[d["type"]] = (d.get("info", ""), d.get("devices", ""))
    names = {dict(lb)["irq"]: dict(lb)["name"] for lb in _select(pt, c.HARDIRQ)}
    for irq in sorted(set(info) & set(names)):
        i, dv = info[irq]
        ok = _name_agrees(irq, names[irq], i, dv)
        out.append(Check(tree, ref, "node_interrupts_total{info,devices} -> pcietax_hardirq_total{name}",
                         irq, names[irq], dv if irq.isdigit() else i, ok))
    return out


def compare_softirqs(tree: str, ref: str, ne: Series, pt: Series) -> list[Check]:
    theirs = {k.lower(): v for k, v in _sum_by(ne, "node_softirqs_functions_total", "type").items()}
    if not theirs:
        return []
    ours = {dict(lb)["vector"]: v for lb, v in _select(pt, c.SOFTIRQ).items()}
    return _pairs(tree, ref, f"node_softirqs_functions_total (sum over cpu) -> {c.SOFTIRQ}", ours, theirs)


def _stat_columns(root: Path) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(irq, softirq) ticks of the aggregate ``cpu`` line and summed over the ``cpuN`` lines."""
    try:
        text = (root / "proc/stat").read_text()
    except OSError:
        return None
    agg, per = (0, 0), [0, 0]
    for line in text.splitlines():
        f = line.split()
        if len(f) > 7 and f[0] == "cpu":
            agg = (int(f[6]), int(f[7]))
        elif len(f) > 7 and f[0].startswith("cpu"):
            per[0] += int(f[6])
            per[1] += int(f[7])
    return agg, (per[0], per[1])


def compare_stat(tree: str, ref: str, root: Path, ne: Series, pt: Series) -> list[Check]:
    theirs = {}
    for mode, kind in (("irq", "irq_coarse"), ("softirq", "softirq_coarse")):
        s = _sum_by(ne, "node_cpu_seconds_total", "mode", lambda d, m=mode: d["mode"] == m)
        if mode in s:
            theirs[kind] = s[mode]
    if not theirs:
        return []
    ours = {dict(lb)["kind"]: v for lb, v in _select(pt, c.STAGING_CPU_SECONDS).items()}
    cols = _stat_columns(root)

    def why(k, a, b) -> str:
        if cols is None or a is None or b is None:
            return ""
        i = 0 if k == "irq_coarse" else 1
        agg, per = cols[0][i] / USER_HZ, cols[1][i] / USER_HZ
        if _same(a, agg) and _same(b, per) and cols[0][i] != cols[1][i]:
            return (f"the fixture's aggregate cpu line says {cols[0][i]} ticks, its cpuN lines sum to "
                    f"{cols[1][i]}: pcietax reads the aggregate line (the kernel sums every possible "
                    "CPU there, so it does not drop when a CPU goes offline), node_exporter sums the "
                    "cpuN lines; on a kernel with every CPU online the two are equal")
        return ""

    return _pairs(tree, ref, f"node_cpu_seconds_total{{mode}} (sum over cpu) -> {c.STAGING_CPU_SECONDS}",
                  ours, theirs, why)


def compare_pcie(tree: str, ref: str, ne: Series, pt: Series) -> list[Check]:
    info = _select(ne, "node_pcidevice_info")
    if not info:
        return []
    in_scope = set()
    for lb in info:
        d = dict(lb)
        base = int(d["class_id"], 16) >> 16
        if base in (0x02, 0x03):  # network and display controllers: the functions pcietax watches
            in_scope.add(f"{d['segment']}:{d['bus']}:{d['device']}.{d['function']}")
    out = []
    for state in ("current", "max"):
        for ne_name, pt_name, scale in (
                (f"node_pcidevice_{state}_link_transfers_per_second", c.PCIE_LINK_SPEED_GTS, 1e9),
                (f"node_pcidevice_{state}_link_width", c.PCIE_LINK_WIDTH, 1.0)):
            theirs = {}
            for lb, v in _select(ne, ne_name).items():
                d = dict(lb)
                addr = f"{d['segment']}:{d['bus']}:{d['device']}.{d['function']}"
                if addr in in_scope:
                    theirs[addr] = v / scale
            ours = {dict(lb)["pci_bus_id"]: v for lb, v in _select(pt, pt_name).items()
                    if dict(lb)["state"] == state}
            out += _pairs(tree, ref, f"{ne_name} -> {pt_name}{{state={state}}}", ours, theirs)
    return out


# Which pcietax source, and which of its files, stands for which node_exporter collector.
COLLECTORS = {"infiniband": ("rdma", ""), "interrupts": ("procfs", "/interrupts"),
              "netdev": ("netdev", ""), "stat": ("procfs", "/stat")}


def compare_sources(tree: str, ref: str, ne: Series, ours: Ours, e2e: bool) -> list[Check]:
    out = []
    for collector, (source, file) in COLLECTORS.items():
        key = ("node_scrape_collector_success", (("collector", collector),))
        if key not in ne or (e2e and collector == "netdev"):
            continue  # upstream's e2e run reads netdev over rtnetlink, from its host, not the tree
        theirs = ne[key] == 1.0
        status = ours.status.get(source, "not run")
        faults = [f for f in ours.faults.get(source, []) if file in f]
        mine = status == "ok" and not faults
        # Both failing on a file that is not in the tree (no /proc/net/dev) is agreement.
        missing = status.startswith("unavailable: cannot read")
        agree = mine == theirs or (missing and not theirs)
        reason = ""
        if mine and not theirs:
            reason = f"node_exporter's {collector} collector fails on this tree; pcietax reads it"
        detail = "ok" if mine else (status if status != "ok" else "; ".join(faults[:3]))
        out.append(Check(tree, ref, f"collector {collector} -> source {source}", "reads cleanly",
                         detail, "success" if theirs else "failed", agree, reason))
    return out


def recount(trees: Iterable[Tree]) -> tuple[list[Check], dict]:
    checks: list[Check] = []
    facts: dict = {}
    for t in trees:
        ours = run_pcietax(t.root)
        facts[t.name] = {"status": ours.status, "faults": ours.faults}
        for ref, ne in t.references.items():
            if ref.endswith("(interrupts only)"):
                checks += [ch for ch in compare_sources(t.name, ref, ne, ours, False)
                           if "interrupts" in ch.what]
                checks += compare_interrupts(t.name, ref, ne, ours.values)
                continue
            checks += compare_sources(t.name, ref, ne, ours, ref.startswith("e2e"))
            checks += compare_rdma(t.name, ref, ne, ours.values)
            checks += compare_netdev(t.name, ref, t.root, ne, ours.values)
            if ne.get(("node_scrape_collector_success", (("collector", "interrupts"),)), 1.0) == 1.0:
                checks += compare_interrupts(t.name, ref, ne, ours.values)
            else:
                facts[t.name].setdefault("notes", []).append(
                    f"{ref}: its interrupts collector fails on this tree, so pcietax's "
                    f"{sum(1 for k in ours.values if k[0] == c.HARDIRQ)} IRQ lines are compared with "
                    "upstream's current parser, ported, instead")
            checks += compare_softirqs(t.name, ref, ne, ours.values)
            checks += compare_stat(t.name, ref, t.root, ne, ours.values)
            checks += compare_pcie(t.name, ref, ne, ours.values)
    return checks, facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-exporter", type=Path, required=True,
                    help="prometheus/node_exporter: a bare git dir (from fetch) or a checkout")
    ap.add_argument("--procfs", type=Path, required=True, help="prometheus/procfs: bare git dir or checkout")
    ap.add_argument("--keep", type=Path, help="extract the trees here and keep them (default: a temp dir)")
    ap.add_argument("--ref", help="recount the package as it is at this git ref of this repository "
                    "(git archive), to compare before and after a change; default: this tree")
    ap.add_argument("--json", action="store_true", help="print every check as JSON instead of text")
    ap.add_argument("--all", action="store_true", help="print agreeing checks too")
    args = ap.parse_args(argv)
    if NODE_EXPORTER is None:
        print("prometheus-node-exporter is not installed (apt-get install prometheus-node-exporter)",
              file=sys.stderr)
        return 2
    tmp = None
    if args.keep:
        work = args.keep
        if work.exists() and any(work.iterdir()):
            print(f"{work} is not empty", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pcietax-recount-")
        work = Path(tmp.name)
    try:
        if args.ref:
            pkg = work / "package"
            pkg.mkdir()
            data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", args.ref, "exporter"],
                                  check=True, capture_output=True).stdout
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                tf.extractall(pkg)  # this repository's own tree at a ref
            load_package(pkg / "exporter")
        else:
            load_package(REPO / "exporter")
        built = build_trees(args.node_exporter, args.procfs, work)
        e2e = parse_exposition(upstream_file(args.node_exporter, "collector/fixtures/e2e-output.txt"))
        trees = []
        for name, root in built:
            refs = {"node_exporter 1.5 (Debian)": run_node_exporter(root)}
            if name == "node_exporter":
                # The upstream binary's own output on this tree (x86 interrupts, 4 KiB pages).
                refs[f"e2e-output.txt @ {head_of(args.node_exporter)}"] = e2e
            if name == "node_exporter_arm64":
                refs["interrupts_linux.go @ HEAD, ported (interrupts only)"] = ported_interrupts(root)
            trees.append(Tree(name, root, refs, {}))
        checks, facts = recount(trees)
    finally:
        if tmp is not None:
            tmp.cleanup()
    agreed = sum(ch.agree for ch in checks)
    if args.json:
        print(json.dumps({"agreed": agreed, "total": len(checks), "facts": facts,
                          "checks": [asdict(ch) for ch in checks]}, indent=1, default=str))
        return 0
    print(f"pcietax @ {args.ref or 'this tree'}; node_exporter @ {head_of(args.node_exporter)}, "
          f"procfs @ {head_of(args.procfs)}")
    for tname, f in facts.items():
        print(f"tree {tname}: " + ", ".join(f"{s} {st}" + (f" ({len(f['faults'][s])} faults)"
                                                           if f["faults"].get(s) else "")
                                            for s, st in f["status"].items()))
        for note in f.get("notes", []):
            print(f"  note: {note}")
    by_group: dict[tuple[str, str, str], list[Check]] = {}
    for ch in checks:
        by_group.setdefault((ch.tree, ch.reference, ch.what), []).append(ch)
    for (tree, ref, what), group in by_group.items():
        ok = sum(ch.agree for ch in group)
        print(f"\n[{tree} vs {ref}] {what}: {ok}/{len(group)}")
        for ch in group:
            if not ch.agree or args.all:
                mark = "ok  " if ch.agree else "DIFF"
                print(f"  {mark} {ch.key}: pcietax={ch.ours!r} node_exporter={ch.theirs!r}"
                      + (f"\n       reason: {ch.reason}" if ch.reason else ""))
    unexplained = [ch for ch in checks if not ch.agree and not ch.reason]
    print(f"\nagreed {agreed}/{len(checks)}; disagreements with a reason (by design or the fixture's own): "
          f"{len(checks) - agreed - len(unexplained)}; unexplained: {len(unexplained)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
