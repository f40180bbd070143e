"""The one PCI classifier: what a function is for pcietax (GPU, NIC, bridge, other), from its class
code and vendor. The pcie source, the topology walk and ``pcietax topo`` all use it, so a BMC's
ASPEED VGA is never a GPU in one place and "other" in another."""

from __future__ import annotations

# Display-class functions that are board management or virtual consoles, never compute GPUs: the
# BMC's ASPEED VGA on almost every server, Matrox G200 (iLO/iDRAC), and VM display adapters.
CONSOLE_VGA_VENDORS = frozenset({0x1A03, 0x102B, 0x1234, 0x1AF4, 0x1013, 0x15AD, 0x1414})


def classify(pci_class: int, vendor: int | None) -> str:
    """``gpu`` (display controllers: VGA, 3D, other; not console VGA), ``nic`` (network controllers,
    InfiniBand included), ``bridge`` (PCI-to-PCI bridges: switch and root ports), else ``other``."""
    base, sub = pci_class >> 16, (pci_class >> 8) & 0xFF
    if base == 0x03:
        return "other" if vendor in CONSOLE_VGA_VENDORS else "gpu"
    if base == 0x02:
        return "nic"
    if base == 0x06 and sub == 0x04:
        return "bridge"
    return "other"
