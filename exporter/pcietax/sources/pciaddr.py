"""PCI addresses as sysfs spells them (``0000:3b:00.0``), from links and from other spellings."""

from __future__ import annotations

import os
import re
from pathlib import Path

PCI_ADDR = re.compile(r"^[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def normalize(addr: str) -> str:
    """``00000000:3B:00.0`` (NVML) or ``3b:00.0`` -> ``0000:3b:00.0``; raises ValueError otherwise."""
    a = addr.strip().lower()
    parts = a.split(":")
    if len(parts) == 2:
        parts = ["0000", *parts]
    if len(parts) != 3:
        raise ValueError(f"not a PCI address: {addr!r}")
    domain = f"{int(parts[0], 16):04x}"
    out = f"{domain}:{parts[1]}:{parts[2]}"
    if not PCI_ADDR.match(out):
        raise ValueError(f"not a PCI address: {addr!r}")
    return out


def pci_of_device_link(device_link: str | os.PathLike[str]) -> str:
    """The PCI function behind a ``.../device`` link (walking up past virtio-style children);
    "" when the device is not on PCI."""
    try:
        p = Path(os.path.realpath(device_link))
    except OSError:
        return ""
    for part in (p, *p.parents):
        if PCI_ADDR.match(part.name):
            return part.name
    return ""


def pci_of_class_link(class_link: str | os.PathLike[str]) -> str:
    """The PCI function of a ``/sys/class/<class>/<name>`` entry, from the entry's own link
    (``../../devices/pci0000:00/0000:00:01.0/0000:3b:00.0/net/eth0``): the last PCI function on
    that path, "" for a virtual device. One readlink instead of resolving ``device`` component by
    component, which on a node with a dozen NICs was most of a netdev read."""
    try:
        target = os.readlink(class_link)
    except OSError:
        return ""
    for part in reversed(target.split("/")):
        if PCI_ADDR.match(part):
            return part
    return ""


def pci_of_class_entry(entry: str | os.PathLike[str]) -> str:
    """The PCI function of a ``/sys/class/<class>/<name>`` entry in any of the layouts found in
    the wild: the kernel's own (the entry is a link into ``devices/``), or a directory holding a
    ``device`` link (sysfs copies, some container views, the prometheus/procfs fixtures). Both the
    netdev source and the topology walk use this one helper; "" for a virtual device."""
    try:
        target = os.readlink(entry)
    except OSError:
        # Not a link (a directory): the layout with a device link inside, if any.
        device = os.path.join(entry, "device")
        return pci_of_device_link(device) if os.path.lexists(device) else ""
    for part in reversed(target.split("/")):
        if PCI_ADDR.match(part):
            return part
    return ""
