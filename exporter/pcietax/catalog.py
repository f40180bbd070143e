"""Every metric family pcietax exports: name, type, labels, help. The Prometheus sink renders from
this table and the README's metrics reference is generated from it (``pcietax metrics --markdown``),
so the contract in ../shared/DESIGN.md section 2 has exactly one home in the code."""

from __future__ import annotations

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


_F = Family

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # --- the tax model -----------------------------------------------------------------
        _F("pcietax_useful_bytes_total", "counter", ("direction",),
           "Useful payload bytes between the network and the workload (socket payload of target "
           "processes plus RDMA port payload).", "model"),
        _F("pcietax_moved_bytes_total", "counter", ("hop", "direction"),
           "Bytes moved by each hop of the data path (absent hops are not exported; see "
           "pcietax_hop_measured).", "model"),
        _F("pcietax_tax_ratio", "gauge", ("direction",),
           "Bytes moved by all measured hops per useful byte over the ratio window (1.0 = direct "
           "path). Partial when any pcietax_hop_measured is 0.", "model"),
        _F("pcietax_hop_measured", "gauge", ("hop",),
           "1 when the hop has a working source and is included in the ratio, 0 when absent.", "model"),
        # --- GPU (NVML) ----------------------------------------------------------------------
        _F("pcietax_gpu_pcie_receive_bytes_total", "counter", ("gpu", "pci_bus_id", "uuid"),
           "Bytes the GPU received over PCIe (NVML). Counted by the device when "
           "pcietax_gpu_info{counter_path=\"field\"}; integrated from GPM rates (gpm) or estimated "
           "from 20 ms throughput samples (throughput_sampled) otherwise.", "nvml"),
        _F("pcietax_gpu_pcie_transmit_bytes_total", "counter", ("gpu", "pci_bus_id", "uuid"),
           "Bytes the GPU transmitted over PCIe (NVML). Counted by the device when "
           "pcietax_gpu_info{counter_path=\"field\"}; integrated from GPM rates (gpm) or estimated "
           "from 20 ms throughput samples (throughput_sampled) otherwise.", "nvml"),
        _F("pcietax_gpu_info", "gauge", ("gpu", "pci_bus_id", "uuid", "name", "numa_node", "counter_path"),
           "One per GPU NVML sees; value is 1. counter_path: field (device byte counters), gpm "
           "(integrated GPM rates), throughput_sampled (estimate from 20 ms samples) or none.", "nvml"),
        # --- PCIe links ----------------------------------------------------------------------
        _F("pcietax_pcie_link_speed_gts", "gauge", ("pci_bus_id", "device_kind", "state"),
           "PCIe link speed in GT/s per lane, state=current (negotiated) or max.", "pcie"),
        _F("pcietax_pcie_link_width", "gauge", ("pci_bus_id", "device_kind", "state"),
           "PCIe link width in lanes, state=current (negotiated) or max.", "pcie"),
        _F("pcietax_pcie_link_ceiling_bytes_per_second", "gauge", ("pci_bus_id", "device_kind"),
           "Usable unidirectional ceiling of the negotiated link after encoding, TLP and flow-control "
           "overhead (pcietax calc).", "pcie"),
        _F("pcietax_pcie_replay_total", "counter", ("pci_bus_id", "device_kind"),
           "PCIe replay events (AER replay timer timeouts and replay number rollovers, or NVML's "
           "replay counter for GPUs).", "pcie"),
        _F("pcietax_pcie_correctable_errors_total", "counter", ("pci_bus_id", "device_kind"),
           "PCIe correctable errors reported by AER.", "pcie"),
        # --- NICs and RDMA -------------------------------------------------------------------
        _F("pcietax_nic_receive_bytes_total", "counter", ("nic", "pci_bus_id"),
           "Bytes received by each physical NIC, counted once per NIC.", "netdev"),
        _F("pcietax_nic_transmit_bytes_total", "counter", ("nic", "pci_bus_id"),
           "Bytes transmitted by each physical NIC, counted once per NIC.", "netdev"),
        _F("pcietax_rdma_port_receive_bytes_total", "counter", ("device", "port"),
           "RDMA port data received (port_rcv_data x 4).", "rdma"),
        _F("pcietax_rdma_port_transmit_bytes_total", "counter", ("device", "port"),
           "RDMA port data transmitted (port_xmit_data x 4).", "rdma"),
        # --- eBPF ----------------------------------------------------------------------------
        _F("pcietax_cuda_copy_bytes_total", "counter",
           ("kind", "memory", "process", "namespace", "pod", "container"),
           "Bytes of CUDA host<->device copies seen by uprobes. Under --cuda.probes sampled (the "
           "default) a scaled estimate: counts from the windows the --probe.budget governor keeps "
           "the probes on, times (elapsed / time on); exact under always.", "ebpf"),
        _F("pcietax_cuda_copy_calls_total", "counter",
           ("kind", "memory", "process", "namespace", "pod", "container"),
           "CUDA host<->device copy calls seen by uprobes; a scaled estimate under --cuda.probes "
           "sampled (see pcietax_cuda_copy_bytes_total), exact under always.", "ebpf"),
        _F("pcietax_memcpy_bytes_total", "counter",
           ("direction", "process", "namespace", "pod", "container"),
           "Bytes glibc memcpy copied into (ingress) or out of (egress) pinned buffers, from the "
           "opt-in --memcpy.probe uprobe.", "ebpf"),
        _F("pcietax_socket_copy_bytes_total", "counter",
           ("direction", "process", "namespace", "pod", "container"),
           "Socket payload (AF_INET/AF_INET6 only; loopback only with --nic lo) copied between kernel "
           "and user space for target processes; a scaled estimate while the --probe.budget governor "
           "duty-cycles the socket probes (exact while they stay on).", "ebpf"),
        _F("pcietax_hardirq_total", "counter", ("irq", "name"),
           "Hard interrupts per IRQ line, summed over CPUs (/proc/interrupts).", "procfs"),
        _F("pcietax_hardirq_seconds_total", "counter", ("irq", "name"),
           "CPU time in hard interrupt handlers per IRQ line (eBPF; a scaled estimate while the "
           "--probe.budget governor duty-cycles the IRQ probes).", "ebpf"),
        _F("pcietax_softirq_total", "counter", ("vector",),
           "Softirqs raised per vector, summed over CPUs (/proc/softirqs).", "procfs"),
        _F("pcietax_softirq_seconds_total", "counter", ("vector",),
           "CPU time in softirq handlers per vector (eBPF; a scaled estimate while the "
           "--probe.budget governor duty-cycles the IRQ probes).", "ebpf"),
        _F("pcietax_staging_cpu_seconds_total", "counter", ("kind",),
           "CPU time spent staging network data: kind=hardirq/softirq_net_rx/softirq_net_tx (eBPF) "
           "or irq_coarse/softirq_coarse (all IRQ and softirq time from /proc/stat).", "procfs"),
        # --- socket interconnect -------------------------------------------------------------
        _F("pcietax_upi_bytes_total", "counter", ("socket", "link", "direction"),
           "Data bytes crossing the CPU socket interconnect (UPI data flits x 64/9), direction=rx/tx "
           "as seen by this socket's end of the link (a crossing is tx on one socket, rx on the other).",
           "upi"),
        _F("pcietax_iio_bytes_total", "counter", ("socket", "stack", "port", "pci_bus", "direction"),
           "Bytes through each PCIe root port of the CPU (IIO free-running counters x the kernel's "
           "scale), direction=rx (device to CPU) or tx (CPU to device); pci_bus is the stack's root "
           "bus. Peer-to-peer traffic below a switch never reaches these counters.", "upi"),
        # --- topology ------------------------------------------------------------------------
        _F("pcietax_gpu_nic_path_info", "gauge", ("gpu", "nic", "path", "gpudirect", "reason"),
           "Topology verdict per GPU-NIC pair: path class and whether GPUDirect RDMA can work.",
           "topology"),
        _F("pcietax_gpu_best_nic_info", "gauge", ("gpu", "nic", "path", "gpudirect", "reason"),
           "Each GPU's best NIC (ready first, then the shortest path) with its verdict; "
           "gpudirect=\"blocked\" means no NIC on the node can reach this GPU peer-to-peer.",
           "topology"),
        # --- the exporter itself -------------------------------------------------------------
        _F("pcietax_source_up", "gauge", ("source",),
           "1 when the source works, 0 when it is down (the reason is logged).", "self"),
        _F("pcietax_source_absent", "gauge", ("source",),
           "1 when the source is down because its hardware or driver is not on this node (no NVIDIA "
           "library, no RDMA device, no uncore PMU): expected, never alerted on. A failure is "
           "source_up=0 with source_absent=0.", "self"),
        _F("pcietax_source_errors_total", "counter", ("source",),
           "Faults absorbed by the source (unreadable or garbage input; the series was skipped).", "self"),
        _F("pcietax_source_resets_total", "counter", ("source",),
           "Counter wraps and resets of the source absorbed so exported counters never go back.", "self"),
        _F("pcietax_probe_hits_total", "counter", ("probe",),
           "Events traced by each of the exporter's probes.", "ebpf"),
        _F("pcietax_probe_overhead_seconds_total", "counter", ("probe", "cost"),
           "CPU time the exporter's probes cost: cost=bpf_run_time (the kernel's bpf_stats), "
           "trap_push / trap_step (uprobe hits x the trap cost calibrated at start for emulated and "
           "single-stepped probe sites), tracepoint_dispatch (hits x calibrated dispatch), "
           "run_time_estimate (hits x a fixed per-hit cost where the kernel does not count).", "ebpf"),
        _F("pcietax_probe_drops_total", "counter", ("reason",),
           "Kernel-side updates the tracer could not make (a full per-process map, a full pinned-"
           "range table, an unresolvable cudaMemcpyDefault): counts short by these events.", "ebpf"),
        _F("pcietax_collect_duration_seconds", "gauge", ("source",),
           "Seconds the source took in the last background collection cycle (not a scrape: scrapes "
           "render the latest cycle).", "self"),
        _F("pcietax_scrape_duration_seconds", "gauge", ("source",),
           "DEPRECATED alias of pcietax_collect_duration_seconds (removed in 0.3.0).", "self"),
        _F("pcietax_build_info", "gauge", ("version", "python", "sources"),
           "Build information; value is 1.", "self"),
    )
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"metric family {name!r} is not in the catalog (pcietax/catalog.py)") from None


def markdown_reference() -> str:
    """The README's metrics reference table."""
    rows = ["| metric | type | labels | source | meaning |", "|---|---|---|---|---|"]
    for f in FAMILIES.values():
        labels = ", ".join(f"`{x}`" for x in f.labels)
        rows.append(f"| `{f.name}` | {f.kind} | {labels} | {f.source} | {f.help} |")
    return "\n".join(rows) + "\n"
