"""Deterministic fixture nodes built with FakeNode, shared by the golden test, the node_exporter
parity test and the scrape benchmark. Same arguments, same bytes: no randomness, no clock.

``gpu_node`` is shaped like an 8-GPU inference server (DGX-H100-like): two sockets, eight PCIe
switches, each with one GPU and one ConnectX-class NIC behind it (six InfiniBand HCAs with IPoIB,
two RoCE NICs), a management NIC, virtual devices, and a /proc/interrupts whose lines look like a
6.x x86 kernel's: IO-APIC lines, per-CPU named lines, ERR/MIS, and MSI-X vectors of every NIC, GPU
and NVMe drive, padded to ``irq_lines`` lines.

The ports of switch 0 have readable config space with an ACS capability that redirects nothing, so
GPU 0 and its NIC (``ibp19s0``) are a GPUDirect-``ready`` PIX pair; every other switch's ports have
no readable config space (an unprivileged view), so their pairs are blocked on ``unknown_acs``.
"""

from __future__ import annotations

from pathlib import Path

from .fakenode import FakeNode, pcie_config_space
from .topotree import PORT_DOWN, PORT_UP, config_space, gpu_resources

NAMED_IRQS = (
    ("NMI", "Non-maskable interrupts"), ("LOC", "Local timer interrupts"),
    ("SPU", "Spurious interrupts"), ("PMI", "Performance monitoring interrupts"),
    ("IWI", "IRQ work interrupts"), ("RTR", "APIC ICR read retries"),
    ("RES", "Rescheduling interrupts"), ("CAL", "Function call interrupts"),
    ("TLB", "TLB shootdowns"), ("TRM", "Thermal event interrupts"),
    ("THR", "Threshold APIC interrupts"), ("DFR", "Deferred Error APIC interrupts"),
    ("MCE", "Machine check exceptions"), ("MCP", "Machine check polls"),
    ("HYP", "Hypervisor callback interrupts"), ("PIN", "Posted-interrupt notification event"),
    ("NPI", "Nested posted-interrupt event"), ("PIW", "Posted-interrupt wakeup event"),
)
IOAPIC = (("0", "2-edge", "timer"), ("8", "8-edge", "rtc0"), ("9", "9-fasteoi", "acpi"),
          ("16", "16-fasteoi", "i801_smbus"))


def _count(i: int, cpu: int, scale: int) -> int:
    """A per-CPU count that looks like affinity: most CPUs see none of a given vector."""
    if (i + cpu) % 7 and i > 30:
        return 0
    return ((i * 7919 + cpu * 104729) % 1_000_003) * scale


def switch_bus(sw: int) -> int:
    """Bus of PCIe switch ``sw``'s upstream port (sockets 0 and 1 hold four switches each)."""
    return 0x10 + (sw % 4) * 0x10 + (0x80 if sw >= 4 else 0)


def nic_name(sw: int) -> str:
    """The netdev of the NIC behind switch ``sw``: IPoIB for 0-5, a RoCE Ethernet port for 6-7
    (``mlx5_<sw>`` is its RDMA device)."""
    return f"ibp{switch_bus(sw) + 3}s0" if sw < 6 else f"ens{sw}f0np0"


def gpu_node(root: Path, *, ncpu: int = 64, irq_lines: int = 1000, scale: int = 1) -> FakeNode:
    """Build the node under ``root``; ``scale`` multiplies every counter (a later read of the same
    node has scale=2: all counters rose)."""
    n = FakeNode(root, ncpu=ncpu)
    irqs: list[tuple[str, list[int], str]] = []
    irq_no = 24
    msix: list[tuple[str, str]] = []  # (pci addr, action name) of every MSI-X vector
    for sw in range(8):
        socket_bus = "0000:00" if sw < 4 else "0000:80"
        root_port = n.add_pci(f"{socket_bus[:5]}{int(socket_bus[5:], 16) + sw % 4 + 1:02x}:01.0", 0x060400,
                              n.root_bus(socket_bus), vendor=0x8086, device=0x352A)
        bus = switch_bus(sw)
        def port(kind: int, sw: int = sw) -> bytes | None:
            return config_space(0x1000, 0xC030, 0x060400, port_type=kind, acs_ctrl=0) if sw == 0 else None

        upstream = n.add_pci(f"0000:{bus:02x}:00.0", 0x060400, root_port, vendor=0x1000, device=0xC030,
                             config=port(PORT_UP))
        down_gpu = n.add_pci(f"0000:{bus + 1:02x}:00.0", 0x060400, upstream, vendor=0x1000, device=0xC030,
                             config=port(PORT_DOWN))
        down_nic = n.add_pci(f"0000:{bus + 1:02x}:01.0", 0x060400, upstream, vendor=0x1000, device=0xC030,
                             config=port(PORT_DOWN))
        gpu_addr = f"0000:{bus + 2:02x}:00.0"
        nic_addr = f"0000:{bus + 3:02x}:00.0"
        n.add_pci(gpu_addr, 0x030200, down_gpu, vendor=0x10DE, device=0x2330,
                  link=("32.0 GT/s PCIe", 16, "32.0 GT/s PCIe", 16),
                  config=pcie_config_space(256 if sw % 2 else 512, 256 if sw < 6 else 64),
                  aer_correctable={"RxErr": sw * scale, "Rollover": sw % 3 * scale,
                                   "Timeout": sw % 2 * scale},
                  resources=gpu_resources())
        nic = n.add_pci(nic_addr, 0x020700 if sw < 6 else 0x020000, down_nic, vendor=0x15B3, device=0x1021,
                        link=("32.0 GT/s PCIe", 16, "32.0 GT/s PCIe", 16),
                        config=pcie_config_space(512, 256),
                        aer_correctable={"BadTLP": sw * 2 * scale})
        ib = sw < 6
        dev = f"mlx5_{sw}"
        iface = nic_name(sw)
        words = (sw + 1) * 10**11 * scale
        n.add_netdev(iface, nic, (sw + 1) * 123_456_789 * scale, (sw + 1) * 98_765_432 * scale)
        n.add_rdma(dev, nic, {1: ("InfiniBand" if ib else "Ethernet", words, words // 3)})
        msix += [(nic_addr, f"mlx5_async{0}@pci:{nic_addr}")]
        msix += [(nic_addr, f"mlx5_comp{q}@pci:{nic_addr}") for q in range(ncpu)]
        msix += [(gpu_addr, "nvidia")]
    mgmt = n.add_pci("0000:05:00.0", 0x020000, vendor=0x8086, device=0x1533,
                     link=("2.5 GT/s PCIe", 1, "2.5 GT/s PCIe", 1))
    n.add_netdev("eno1", mgmt, 5_000_000 * scale, 7_000_000 * scale)
    for virt in ("lo", "docker0", "veth9f3a1c2"):
        n.add_netdev(virt, None, 42 * scale, 42 * scale)
    msix += [("0000:05:00.0", "eno1")]
    nvme = 0
    for i, (irq, trig, action) in enumerate(IOAPIC):
        irqs.append((irq, [_count(i, c, scale) for c in range(ncpu)], f"IR-IO-APIC   {trig}   {action}"))
    while len(irqs) + len(NAMED_IRQS) < irq_lines:
        if msix:
            addr, action = msix.pop(0)
        else:
            addr, action = "0000:0a:00.0", f"nvme0q{nvme}"
            nvme += 1
        i = len(irqs)
        irqs.append((str(irq_no), [_count(i, c, scale) for c in range(ncpu)],
                     f"IR-PCI-MSIX-{addr}   {i}-edge      {action}"))
        irq_no += 1
    for j, (name, text) in enumerate(NAMED_IRQS):
        irqs.append((name, [_count(j + 5, c, scale) for c in range(ncpu)], text))
    n.write_interrupts(irqs)
    with open(n.proc / "interrupts", "a") as f:
        f.write(f"ERR:          {3 * scale}\nMIS:          0\n")
    n.write_softirqs({v: [(k + 1) * (c + 1) * 1000 * scale for c in range(ncpu)]
                      for k, v in enumerate(("HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "SCHED", "RCU"))})
    n.write_stat([c * 10 * scale for c in range(ncpu)], [c * 20 * scale for c in range(ncpu)])
    return n
