"""Every metric family pcietax exports: name, type, labels, help. The Prometheus sink renders from
this table and the README's metrics reference is generated from it (``pcietax metrics --markdown``),
so the contract in ../shared/DESIGN.md section 2 has exactly one home in the code."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    source: str  # which source (or "model"/"self") feeds it, for the reference table


# Family names: every module imports these instead of spelling a name (one home for names).
USEFUL_BYTES = "pcietax_useful_bytes_total"
MOVED_BYTES = "pcietax_moved_bytes_total"
TAX_RATIO = "pcietax_tax_ratio"
HOP_MEASURED = "pcietax_hop_measured"
GPU_PCIE_RECEIVE_BYTES = "pcietax_gpu_pcie_receive_bytes_total"
GPU_PCIE_TRANSMIT_BYTES = "pcietax_gpu_pcie_transmit_bytes_total"
GPU_INFO = "pcietax_gpu_info"
PCIE_LINK_SPEED_GTS = "pcietax_pcie_link_speed_gts"
PCIE_LINK_WIDTH = "pcietax_pcie_link_width"
PCIE_LINK_CEILING_BYTES_PER_SECOND = "pcietax_pcie_link_ceiling_bytes_per_second"
PCIE_REPLAY = "pcietax_pcie_replay_total"
PCIE_CORRECTABLE_ERRORS = "pcietax_pcie_correctable_errors_total"
NIC_RECEIVE_BYTES = "pcietax_nic_receive_bytes_total"
NIC_TRANSMIT_BYTES = "pcietax_nic_transmit_bytes_total"
NIC_IPOIB_RECEIVE_BYTES = "pcietax_nic_ipoib_receive_bytes_total"
NIC_IPOIB_TRANSMIT_BYTES = "pcietax_nic_ipoib_transmit_bytes_total"
RDMA_PORT_RECEIVE_BYTES = "pcietax_rdma_port_receive_bytes_total"
RDMA_PORT_TRANSMIT_BYTES = "pcietax_rdma_port_transmit_bytes_total"
CUDA_COPY_BYTES = "pcietax_cuda_copy_bytes_total"
CUDA_COPY_CALLS = "pcietax_cuda_copy_calls_total"
MEMCPY_BYTES = "pcietax_memcpy_bytes_total"
SOCKET_COPY_BYTES = "pcietax_socket_copy_bytes_total"
HARDIRQ = "pcietax_hardirq_total"
HARDIRQ_SECONDS = "pcietax_hardirq_seconds_total"
SOFTIRQ = "pcietax_softirq_total"
SOFTIRQ_SECONDS = "pcietax_softirq_seconds_total"
STAGING_CPU_SECONDS = "pcietax_staging_cpu_seconds_total"
UPI_BYTES = "pcietax_upi_bytes_total"
IIO_BYTES = "pcietax_iio_bytes_total"
GPU_NIC_PATH_INFO = "pcietax_gpu_nic_path_info"
GPU_BEST_NIC_INFO = "pcietax_gpu_best_nic_info"
SOURCE_UP = "pcietax_source_up"
SOURCE_ABSENT = "pcietax_source_absent"
SOURCE_ERRORS = "pcietax_source_errors_total"
SOURCE_RESETS = "pcietax_source_resets_total"
PROBE_HITS = "pcietax_probe_hits_total"
PROBE_OVERHEAD_SECONDS = "pcietax_probe_overhead_seconds_total"
PROBE_DROPS = "pcietax_probe_drops_total"
COLLECT_DURATION_SECONDS = "pcietax_collect_duration_seconds"
COLLECT_RESTING = "pcietax_collect_resting"
SCRAPE_DURATION_SECONDS = "pcietax_scrape_duration_seconds"
BUILD_INFO = "pcietax_build_info"

# The scoped-RDMA rule, said wherever the ratio is shown (HELP here, README, dashboards, alerts).
SCOPE_RULE = (
    "--target.* scopes only what eBPF attributes per process (socket payload, CUDA and memcpy "
    "copies); RDMA verbs payload, NIC, NVML and UPI bytes are node-wide, because port and device "
    "counters cannot be split per process, so verbs traffic adds alike to useful and moved bytes "
    "and a scoped ratio is the targets' own only when they carry the node's network traffic."
)

# `gpu` is one identifier on every family: the GPU's PCI address as sysfs spells it
# (0000:3b:00.0), which NVML, topology and the pcie source all know. NVML's index is not stable
# across driver reloads and topology cannot know it.
GPU_ID = "PCI address (sysfs form, 0000:3b:00.0)"

# `direction` is ingress (network -> GPU) / egress (GPU -> network) on every family, except where
# the counter has no network side: a socket-interconnect or root-port counter only knows which way
# bytes crossed it, so it says rx/tx as seen by its own end.
DIRECTIONS = ("ingress", "egress")
DIRECTION_EXCEPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    UPI_BYTES: (("rx", "tx"), "a UPI link has no network side: rx/tx as seen by this socket"),
    IIO_BYTES: (("rx", "tx"), "a root port has no network side: rx device->CPU, tx CPU->device"),
}

_F = Family

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # --- the tax model -----------------------------------------------------------------
        _F(USEFUL_BYTES, "counter", ("direction",),
           "Useful payload bytes between the network and the workload: socket payload of target "
           "processes plus RDMA verbs payload (port bytes minus the IPoIB traffic inside them). "
           + SCOPE_RULE, "model"),
        _F(MOVED_BYTES, "counter", ("hop", "direction"),
           "Bytes moved by each hop of the data path (absent hops are not exported; see "
           "pcietax_hop_measured).", "model"),
        _F(TAX_RATIO, "gauge", ("direction",),
           "Bytes moved by all measured hops per useful byte over the ratio window (1.0 = direct "
           "path). Partial when any pcietax_hop_measured is 0. " + SCOPE_RULE, "model"),
        _F(HOP_MEASURED, "gauge", ("hop",),
           "1 when the hop has a working source and is included in the ratio, 0 when absent.", "model"),
        # --- GPU (NVML) ----------------------------------------------------------------------
        _F(GPU_PCIE_RECEIVE_BYTES, "counter", ("gpu", "pci_bus_id", "uuid"),
           "Bytes the GPU received over PCIe (NVML). Counted by the device when "
           "pcietax_gpu_info{counter_path=\"field\"}; integrated from GPM rates (gpm) or estimated "
           "from 20 ms throughput samples (throughput_sampled) otherwise.", "nvml"),
        _F(GPU_PCIE_TRANSMIT_BYTES, "counter", ("gpu", "pci_bus_id", "uuid"),
           "Bytes the GPU transmitted over PCIe (NVML). Counted by the device when "
           "pcietax_gpu_info{counter_path=\"field\"}; integrated from GPM rates (gpm) or estimated "
           "from 20 ms throughput samples (throughput_sampled) otherwise.", "nvml"),
        _F(GPU_INFO, "gauge", ("gpu", "pci_bus_id", "uuid", "name", "numa_node", "counter_path"),
           "One per GPU NVML sees; value is 1. gpu is its PCI address, the identifier every family "
           "uses. counter_path: field (device byte counters), gpm "
           "(integrated GPM rates), throughput_sampled (estimate from 20 ms samples) or none.", "nvml"),
        # --- PCIe links ----------------------------------------------------------------------
        _F(PCIE_LINK_SPEED_GTS, "gauge", ("pci_bus_id", "device_kind", "state"),
           "PCIe link speed in GT/s per lane, state=current (negotiated) or max.", "pcie"),
        _F(PCIE_LINK_WIDTH, "gauge", ("pci_bus_id", "device_kind", "state"),
           "PCIe link width in lanes, state=current (negotiated) or max.", "pcie"),
        _F(PCIE_LINK_CEILING_BYTES_PER_SECOND, "gauge", ("pci_bus_id", "device_kind"),
           "Usable unidirectional ceiling of the negotiated link after encoding, TLP and flow-control "
           "overhead (pcietax calc).", "pcie"),
        _F(PCIE_REPLAY, "counter", ("pci_bus_id", "device_kind"),
           "PCIe replay events (AER replay timer timeouts and replay number rollovers, or NVML's "
           "replay counter for GPUs).", "pcie"),
        _F(PCIE_CORRECTABLE_ERRORS, "counter", ("pci_bus_id", "device_kind"),
           "PCIe correctable errors reported by AER.", "pcie"),
        # --- NICs and RDMA -------------------------------------------------------------------
        _F(NIC_RECEIVE_BYTES, "counter", ("nic", "pci_bus_id"),
           "Bytes received by each physical NIC, counted once per NIC.", "netdev"),
        _F(NIC_TRANSMIT_BYTES, "counter", ("nic", "pci_bus_id"),
           "Bytes transmitted by each physical NIC, counted once per NIC.", "netdev"),
        _F(NIC_IPOIB_RECEIVE_BYTES, "counter", ("nic", "pci_bus_id"),
           "Bytes received by the IPoIB netdev of an InfiniBand HCA: already inside its RDMA port "
           "counters and its pcietax_nic bytes; the model subtracts them from the port bytes so TCP "
           "over IPoIB is not useful twice.", "netdev"),
        _F(NIC_IPOIB_TRANSMIT_BYTES, "counter", ("nic", "pci_bus_id"),
           "Bytes transmitted by the IPoIB netdev of an InfiniBand HCA (see "
           "pcietax_nic_ipoib_receive_bytes_total).", "netdev"),
        _F(RDMA_PORT_RECEIVE_BYTES, "counter", ("device", "port"),
           "RDMA port data received (port_rcv_data x 4).", "rdma"),
        _F(RDMA_PORT_TRANSMIT_BYTES, "counter", ("device", "port"),
           "RDMA port data transmitted (port_xmit_data x 4).", "rdma"),
        # --- eBPF ----------------------------------------------------------------------------
        _F(CUDA_COPY_BYTES, "counter",
           ("kind", "memory", "process", "namespace", "pod", "container"),
           "Bytes of CUDA host<->device copies seen by uprobes. Under --cuda.probes sampled (the "
           "default) a scaled estimate: counts from the windows the --probe.budget governor keeps "
           "the probes on, times (elapsed / time on); exact under always.", "ebpf"),
        _F(CUDA_COPY_CALLS, "counter",
           ("kind", "memory", "process", "namespace", "pod", "container"),
           "CUDA host<->device copy calls seen by uprobes; a scaled estimate under --cuda.probes "
           "sampled (see pcietax_cuda_copy_bytes_total), exact under always.", "ebpf"),
        _F(MEMCPY_BYTES, "counter",
           ("direction", "process", "namespace", "pod", "container"),
           "Bytes glibc memcpy copied into (ingress) or out of (egress) pinned buffers, from the "
           "opt-in --memcpy.probe uprobe.", "ebpf"),
        _F(SOCKET_COPY_BYTES, "counter",
           ("direction", "process", "namespace", "pod", "container"),
           "Socket payload (AF_INET/AF_INET6 only; loopback only with --nic lo) copied between kernel "
           "and user space for target processes; a scaled estimate while the --probe.budget governor "
           "duty-cycles the socket probes (exact while they stay on).", "ebpf"),
        _F(HARDIRQ, "counter", ("irq", "name"),
           "Hard interrupts per IRQ line, summed over CPUs (/proc/interrupts).", "procfs"),
        _F(HARDIRQ_SECONDS, "counter", ("irq", "name"),
           "CPU time in hard interrupt handlers per IRQ line (eBPF; a scaled estimate while the "
           "--probe.budget governor duty-cycles the IRQ probes).", "ebpf"),
        _F(SOFTIRQ, "counter", ("vector",),
           "Softirqs raised per vector, summed over CPUs (/proc/softirqs).", "procfs"),
        _F(SOFTIRQ_SECONDS, "counter", ("vector",),
           "CPU time in softirq handlers per vector (eBPF; a scaled estimate while the "
           "--probe.budget governor duty-cycles the IRQ probes).", "ebpf"),
        _F(STAGING_CPU_SECONDS, "counter", ("kind",),
           "CPU time spent staging network data: kind=hardirq/softirq_net_rx/softirq_net_tx (eBPF) "
           "or irq_coarse/softirq_coarse (all IRQ and softirq time from /proc/stat).", "procfs"),
        # --- socket interconnect -------------------------------------------------------------
        _F(UPI_BYTES, "counter", ("socket", "link", "direction"),
           "Data bytes crossing the CPU socket interconnect (UPI data flits x 64/9), direction=rx/tx "
           "as seen by this socket's end of the link (a crossing is tx on one socket, rx on the other).",
           "upi"),
        _F(IIO_BYTES, "counter", ("socket", "stack", "port", "pci_bus", "direction"),
           "Bytes through each PCIe root port of the CPU (IIO free-running counters x the kernel's "
           "scale), direction=rx (device to CPU) or tx (CPU to device); pci_bus is the stack's root "
           "bus. Peer-to-peer traffic below a switch never reaches these counters.", "upi"),
        # --- topology ------------------------------------------------------------------------
        _F(GPU_NIC_PATH_INFO, "gauge", ("gpu", "nic", "path", "gpudirect", "reason"),
           "Topology verdict per GPU-NIC pair: path class and whether GPUDirect RDMA can work.",
           "topology"),
        _F(GPU_BEST_NIC_INFO, "gauge", ("gpu", "nic", "path", "gpudirect", "reason"),
           "Each GPU's best NIC (ready first, then the shortest path) with its verdict; "
           "gpudirect=\"blocked\" means no NIC on the node can reach this GPU peer-to-peer.",
           "topology"),
        # --- the exporter itself -------------------------------------------------------------
        _F(SOURCE_UP, "gauge", ("source",),
           "1 when the source works, 0 when it is down (the reason is logged).", "self"),
        _F(SOURCE_ABSENT, "gauge", ("source",),
           "1 when the source is down because its hardware or driver is not on this node (no NVIDIA "
           "library, no RDMA device, no uncore PMU): expected, never alerted on. A failure is "
           "source_up=0 with source_absent=0.", "self"),
        _F(SOURCE_ERRORS, "counter", ("source",),
           "Faults absorbed by the source (unreadable or garbage input; the series was skipped).", "self"),
        _F(SOURCE_RESETS, "counter", ("source",),
           "Counter wraps and resets of the source absorbed so exported counters never go back.", "self"),
        _F(PROBE_HITS, "counter", ("probe",),
           "Events traced by each of the exporter's probes.", "ebpf"),
        _F(PROBE_OVERHEAD_SECONDS, "counter", ("probe", "cost"),
           "CPU time the exporter's probes cost: cost=bpf_run_time (the kernel's bpf_stats), "
           "trap_push / trap_step (uprobe hits x the trap cost calibrated at start for emulated and "
           "single-stepped probe sites), tracepoint_dispatch (hits x calibrated dispatch), "
           "run_time_estimate (hits x a fixed per-hit cost where the kernel does not count).", "ebpf"),
        _F(PROBE_DROPS, "counter", ("reason",),
           "Kernel-side updates the tracer could not make (a full per-process map, a full pinned-"
           "range table, an unresolvable cudaMemcpyDefault): counts short by these events.", "ebpf"),
        _F(COLLECT_DURATION_SECONDS, "gauge", ("source",),
           "Seconds the source took in the last background collection cycle (not a scrape: scrapes "
           "render the latest cycle).", "self"),
        _F(COLLECT_RESTING, "gauge", (),
           "1 while the node is at rest (payload below the ratio's --ratio.min-useful-bytes per "
           "--ratio.window): sources are read every --collect.rest-interval, not every "
           "--collect.interval; 0 while payload flows.", "self"),
        _F(SCRAPE_DURATION_SECONDS, "gauge", ("source",),
           "DEPRECATED alias of pcietax_collect_duration_seconds (removed in 0.3.0).", "self"),
        _F(BUILD_INFO, "gauge", ("version", "python", "sources"),
           "Build information; value is 1.", "self"),
    )
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"metric family {name!r} is not in the catalog (pcietax/catalog.py)") from None


def direction_values(name: str) -> tuple[str, ...]:
    exc = DIRECTION_EXCEPTIONS.get(name)
    return exc[0] if exc else DIRECTIONS


class LabelSetMismatch(ValueError):
    """An emitted series whose label names differ from its family's in the catalog: a programming
    error that would render as a duplicate or lose a label, so it fails loudly."""


def check_labels(name: str, labels: Iterable[tuple[str, str]]) -> None:
    """Raise unless ``labels`` (pairs) carry exactly the family's label names, with a `direction`
    value the catalog allows."""
    f = family(name)
    got = dict(labels)
    if set(got) != set(f.labels):
        raise LabelSetMismatch(f"{name}: labels {sorted(got)} differ from the catalog's {sorted(f.labels)}")
    x = got.get("direction")
    if x is not None and x not in direction_values(name):
        raise LabelSetMismatch(f"{name}: direction={x!r} is not one of {direction_values(name)}")


def markdown_reference() -> str:
    """The README's metrics reference table."""
    rows = ["| metric | type | labels | source | meaning |", "|---|---|---|---|---|"]
    for f in FAMILIES.values():
        labels = ", ".join(f"`{x}`" for x in f.labels)
        rows.append(f"| `{f.name}` | {f.kind} | {labels} | {f.source} | {f.help} |")
    return "\n".join(rows) + "\n"
