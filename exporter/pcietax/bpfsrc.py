"""Where the BPF C sources are: ``pcietax/ebpf/`` inside an installed wheel (hatchling
force-include), or the repository's ``ebpf/`` in a source checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def bpf_dir() -> Path:
    for d in (_PKG / "ebpf", _PKG.parent.parent / "ebpf"):
        if d.is_dir():
            return d
    raise FileNotFoundError(
        f"BPF sources not found in {_PKG / 'ebpf'} (installed) or {_PKG.parent.parent / 'ebpf'} "
        "(checkout); reinstall pcietax with `pip install .`"
    )


def bpf_source(name: str) -> str:
    """The text of one program, e.g. ``bpf_source("softirq.c")``."""
    return (bpf_dir() / name).read_text()
