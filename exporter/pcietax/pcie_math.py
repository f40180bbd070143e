"""PCIe ceiling math (DESIGN.md section 4): from the raw signalling rate down to what a link can
really carry in one direction, one layer at a time, so every factor is visible and checkable.

usable = lanes x rate x encoding / 8 x TLP efficiency x flow-control factor, where
TLP efficiency = MPS / (MPS + framing + sequence + header + LCRC [+ ECRC]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

RATE_GTS = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
WIDTHS = (1, 2, 4, 8, 12, 16, 32)
MPS_VALUES = (128, 256, 512, 1024, 2048, 4096)
ENCODING = {1: (8, 10), 2: (8, 10), 3: (128, 130), 4: (128, 130), 5: (128, 130), 6: (242, 256)}
# The commonly quoted Gen5 x16 table, and the share of link time its last step gives to ACK/NAK
# and UpdateFC DLLPs (55.8 / 58.1).
QUOTED_GEN5_X16 = {"raw": 64.0, "encoded": 63.0, "tlp": 58.1, "usable": 55.8}
QUOTED_TABLE = "the commonly quoted table (64.0 \u2192 63.0 \u2192 58.1 \u2192 55.8 GB/s)"
DEFAULT_FLOW_CONTROL = round(55.8 / 58.1, 4)


@dataclass(frozen=True)
class TlpOverhead:
    framing: int  # STP/END symbols (Gen1-2: 2 B) or the STP token (Gen3-5: 4 B); none in FLIT mode
    sequence: int
    header: int
    lcrc: int
    ecrc: int

    @property
    def total(self) -> int:
        return self.framing + self.sequence + self.header + self.lcrc + self.ecrc


@dataclass(frozen=True)
class Ceiling:
    gen: int
    width: int
    mps: int
    header_bytes: int
    ecrc: bool
    rate_gts: float
    encoding: str
    encoding_efficiency: float
    tlp_overhead_bytes: int
    tlp_efficiency: float
    flow_control_factor: float
    raw_gbps: float  # GB/s, 1 GB = 1e9 bytes
    encoded_gbps: float
    tlp_gbps: float
    usable_gbps: float

    @property
    def usable_bytes_per_second(self) -> float:
        return self.usable_gbps * 1e9

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def gen_of_speed(gts: float) -> int:
    """Link generation from a per-lane rate in GT/s (sysfs ``current_link_speed``)."""
    for gen, rate in RATE_GTS.items():
        if abs(rate - gts) < 0.01:
            return gen
    raise ValueError(f"unknown PCIe link speed {gts} GT/s (known: {sorted(RATE_GTS.values())})")


def tlp_overhead(gen: int, header_bytes: int = 12, ecrc: bool = False) -> TlpOverhead:
    if gen == 6:
        # FLIT mode: sequence numbers, CRC and FEC live in the 256 B flit (the 242/256 step).
        return TlpOverhead(0, 0, header_bytes, 0, 4 if ecrc else 0)
    return TlpOverhead(2 if gen <= 2 else 4, 2, header_bytes, 4, 4 if ecrc else 0)


def ceiling(
    gen: int,
    width: int,
    mps: int = 256,
    header_bytes: int = 12,
    ecrc: bool = False,
    flow_control: float = DEFAULT_FLOW_CONTROL,
) -> Ceiling:
    if gen not in RATE_GTS:
        raise ValueError(f"--gen must be one of {sorted(RATE_GTS)}, got {gen}")
    if width not in WIDTHS:
        raise ValueError(f"--width must be one of {list(WIDTHS)}, got {width}")
    if mps not in MPS_VALUES:
        raise ValueError(f"--mps must be one of {list(MPS_VALUES)}, got {mps}")
    if header_bytes not in (12, 16):
        raise ValueError(f"--header must be 12 (3DW) or 16 (4DW) bytes, got {header_bytes}")
    if not 0 < flow_control <= 1:
        raise ValueError(f"--flow-control must be in (0, 1], got {flow_control}")
    rate = RATE_GTS[gen]
    num, den = ENCODING[gen]
    enc = num / den
    ovh = tlp_overhead(gen, header_bytes, ecrc)
    tlp = mps / (mps + ovh.total)
    raw = width * rate / 8
    encoded = raw * enc
    after_tlp = encoded * tlp
    return Ceiling(
        gen=gen, width=width, mps=mps, header_bytes=header_bytes, ecrc=ecrc, rate_gts=rate,
        encoding=f"{num}b/{den}b" if gen < 6 else "242/256 FLIT", encoding_efficiency=enc,
        tlp_overhead_bytes=ovh.total, tlp_efficiency=tlp, flow_control_factor=flow_control,
        raw_gbps=raw, encoded_gbps=encoded, tlp_gbps=after_tlp, usable_gbps=after_tlp * flow_control,
    )


def quoted_differences(c: Ceiling) -> list[str]:
    """Where the commonly quoted, rounded Gen5 x16 table differs from the first-principles value."""
    if (c.gen, c.width) != (5, 16):
        return []
    ours = {"raw": c.raw_gbps, "encoded": c.encoded_gbps, "tlp": c.tlp_gbps, "usable": c.usable_gbps}
    notes = []
    for layer, quoted in QUOTED_GEN5_X16.items():
        if abs(ours[layer] - quoted) >= 0.05:
            notes.append(
                f"{layer}: quoted {quoted:.1f} GB/s, first principles {ours[layer]:.2f} GB/s "
                f"({(quoted / ours[layer] - 1) * 100:+.1f}%)"
            )
    return notes


def render_table(c: Ceiling) -> str:
    o = tlp_overhead(c.gen, c.header_bytes, c.ecrc)
    rows = [
        f"PCIe Gen{c.gen} x{c.width}, MPS {c.mps} B, {c.header_bytes} B header"
        f"{', ECRC' if c.ecrc else ''}",
        "",
        f"{'layer':<22}{'GB/s':>9}  parameters",
        f"{'raw signalling':<22}{c.raw_gbps:>9.2f}  {c.width} lanes x {c.rate_gts:g} GT/s / 8",
        f"{'after encoding':<22}{c.encoded_gbps:>9.2f}  {c.encoding} = {c.encoding_efficiency:.4f}",
        f"{'after TLP overhead':<22}{c.tlp_gbps:>9.2f}  {c.mps}/({c.mps}+{o.framing} framing+"
        f"{o.sequence} seq+{o.header} hdr+{o.lcrc} LCRC+{o.ecrc} ECRC) = {c.tlp_efficiency:.4f}",
        f"{'usable (DLLP/FC)':<22}{c.usable_gbps:>9.2f}  x {c.flow_control_factor:.4f} for ACK/NAK and "
        "UpdateFC DLLPs",
    ]
    diffs = quoted_differences(c)
    if diffs:
        rows += ["", f"where {QUOTED_TABLE} rounds differently:", *(f"  {d}" for d in diffs)]
    return "\n".join(rows) + "\n"
