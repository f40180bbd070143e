"""Series per node, counted from a real scrape of the 8-GPU fixture node (tests/helpers/gpunode.py:
8 GPUs behind 8 PCIe switches, 8 RDMA NICs, a management NIC, 64 CPUs, 1000 IRQ lines).

The exporter runs in this process with every source but eBPF on the fixture tree, NVML through the
scripted 8-GPU fake (tests/helpers/fakenvml.py) on the fixture's GPU bus addresses, behind the real
HTTP server; /metrics is scraped over loopback and its samples counted per family. eBPF's
per-process families are bounded by --top (default 20 processes + "other"); their ceiling is added
from the catalog's label sets, not measured, and printed separately.

    python bench/series_per_node.py [--ncpu 64] [--irq-lines 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "exporter"), str(REPO / "tests")]

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

# eBPF families and how many series each has at most: label values bounded per DESIGN.md section 2.
EBPF_CEILING = {
    "pcietax_cuda_copy_bytes_total": "kind(2) x memory(2) x process(top+1)",
    "pcietax_cuda_copy_calls_total": "kind(2) x memory(2) x process(top+1)",
    "pcietax_memcpy_bytes_total": "direction(2) x process(top+1)",
    "pcietax_socket_copy_bytes_total": "direction(2) x process(top+1)",
}


def ebpf_ceiling(top: int, probes: int, nic_irqs: int) -> dict[str, int]:
    p = top + 1
    return {
        "pcietax_cuda_copy_bytes_total": 4 * p,
        "pcietax_cuda_copy_calls_total": 4 * p,
        "pcietax_memcpy_bytes_total": 2 * p,
        "pcietax_socket_copy_bytes_total": 2 * p,
        "pcietax_probe_hits_total": probes,
        "pcietax_probe_overhead_seconds_total": probes,
        "pcietax_hardirq_seconds_total": nic_irqs,
        "pcietax_softirq_seconds_total": 10,
    }


def count(ncpu: int, irq_lines: int) -> tuple[Counter[str], int]:
    from helpers.fakenvml import FakeGpu, FakeNvml
    from helpers.gpunode import gpu_node
    from pcietax.engine import Engine
    from pcietax.model import TaxModel
    from pcietax.server import make_server
    from pcietax.sinks.prometheus import PcietaxRegistry
    from pcietax.sources import SOURCES, SourceOptions
    from pcietax.sources.nvml import NvmlSource

    with tempfile.TemporaryDirectory() as tmp:
        node = gpu_node(Path(tmp) / "node", ncpu=ncpu, irq_lines=irq_lines)
        devices = node.sys / "bus/pci/devices"
        gpus = sorted(d.name for d in devices.iterdir()
                      if (d / "vendor").read_text().strip() == "0x10de"
                      and (d / "class").read_text().strip().startswith("0x03"))
        fake = FakeNvml(gpus=[FakeGpu(pci_bus_id="0000" + g) for g in gpus])
        opts = SourceOptions(sysfs=str(node.sys), procfs=str(node.proc))
        sources = [NvmlSource(fake, sysfs=str(node.sys))]
        sources += [s.build(opts) for s in SOURCES if s.name not in ("nvml", "ebpf")]
        engine = Engine(sources, TaxModel())
        registry = PcietaxRegistry(engine.frame, [s.name for s in sources])
        srv = make_server("127.0.0.1:0", registry)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            engine.start_sources()
            engine.collect()
            time.sleep(0.2)
            engine.collect()
            url = f"http://127.0.0.1:{srv.server_address[1]}/metrics"
            with urllib.request.urlopen(url, timeout=30) as r:
                text = r.read().decode()
        finally:
            srv.shutdown()
            srv.server_close()
            engine.close()
    per_family: Counter[str] = Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            per_family[fam.name if fam.type != "counter" else s.name] += 1
    return per_family, len(gpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ncpu", type=int, default=64)
    ap.add_argument("--irq-lines", type=int, default=1000)
    ap.add_argument("--top", type=int, default=20, help="per-process top N (pcietax's default: 20)")
    ap.add_argument("--probes", type=int, default=7, help="eBPF probe groups (pcietax_probe_hits_total)")
    ap.add_argument("--nic-irqs", type=int, default=8 * 64,
                    help="NIC IRQ lines the eBPF hardirq probe times (8 NICs x 64 queues)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    fams, ngpu = count(args.ncpu, args.irq_lines)
    ceiling = ebpf_ceiling(args.top, args.probes, args.nic_irqs)
    scraped = sum(fams.values())
    extra = sum(v for k, v in ceiling.items() if k not in fams)
    if args.json:
        print(json.dumps({"gpus": ngpu, "scraped": scraped, "ebpf_ceiling": extra,
                          "families": dict(fams.most_common())}, indent=2))
        return 0
    print(f"8-GPU fixture node ({ngpu} GPUs, {args.ncpu} CPUs, {args.irq_lines} IRQ lines): "
          f"{scraped} series scraped")
    for name, n in fams.most_common():
        print(f"  {n:6d}  {name}")
    print(f"eBPF per-process and timing families, at most: {extra} more ({args.top} processes + other)")
    print(f"total per node, at most: {scraped + extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
