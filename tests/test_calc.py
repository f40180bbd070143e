"""`pcietax calc`: every generation, width, payload size, header size and ECRC setting against
values computed here from the PCIe specification's numbers (not from pcie_math), the commonly quoted Gen5
x16 table and where its rounding differs, --json, and every bad value."""

from __future__ import annotations

import itertools
import json
import math
import subprocess

import pytest

from conftest import pcietax_cmd, pcietax_env
from pcietax.cli import main

# PCIe base specification: per-lane signalling rate (GT/s) and line encoding per generation.
SPEC_RATE = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
SPEC_ENCODING = {1: 8 / 10, 2: 8 / 10, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130, 6: 242 / 256}
# The commonly quoted Gen5 x16 table (GB/s) and the flow-control share its last row implies.
QUOTED = (64.0, 63.0, 58.1, 55.8)
FLOW_CONTROL = 55.8 / 58.1


def per_tlp_overhead(gen: int, header: int, ecrc: bool) -> int:
    """Bytes added to each TLP's payload on the wire, by generation (PCIe base spec):
    Gen1/2: STP + END framing symbols (1 B each), 2 B sequence number, header, 4 B LCRC.
    Gen3-5: a 4 B STP framing token replaces the symbols; sequence, header, LCRC as before.
    Gen6 (FLIT mode): sequence numbers, CRC and FEC are per 256 B flit (the 242/256 factor), so a
    TLP carries only its header. ECRC adds 4 B in every generation."""
    e = 4 if ecrc else 0
    if gen <= 2:
        return 1 + 1 + 2 + header + 4 + e
    if gen <= 5:
        return 4 + 2 + header + 4 + e
    return header + e


def expected(gen: int, width: int, mps: int, header: int, ecrc: bool) -> dict[str, float]:
    raw = width * SPEC_RATE[gen] / 8  # GB/s: GT/s per lane, one bit per transfer, 8 bits a byte
    enc = raw * SPEC_ENCODING[gen]
    tlp = enc * mps / (mps + per_tlp_overhead(gen, header, ecrc))
    return {"raw_gbps": raw, "encoded_gbps": enc, "tlp_gbps": tlp, "usable_gbps": tlp * FLOW_CONTROL}


def calc_json(capsys, *args: str) -> dict:
    assert main(["calc", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


GRID = list(itertools.product(range(1, 7), (1, 2, 4, 8, 12, 16, 32), (128, 256, 512, 1024, 2048, 4096),
                              (12, 16), (False, True)))


def test_every_combination_matches_the_spec(capsys):
    for gen, width, mps, header, ecrc in GRID:
        args = ["--gen", str(gen), "--width", str(width), "--mps", str(mps), "--header", str(header)]
        got = calc_json(capsys, *args, *(["--ecrc"] if ecrc else []))
        want = expected(gen, width, mps, header, ecrc)
        for k, v in want.items():
            # The CLI's default flow-control factor is the quoted table's ratio rounded to 4 places.
            assert math.isclose(got[k], v, rel_tol=1e-4), (gen, width, mps, header, ecrc, k, got[k], v)
        assert got["tlp_overhead_bytes"] == per_tlp_overhead(gen, header, ecrc)
        assert (got["gen"], got["width"], got["mps"], got["header_bytes"], got["ecrc"]) == (
            gen, width, mps, header, ecrc)


@pytest.mark.parametrize(("gen", "width", "published", "usable_floor"), [
    # The per-direction bandwidths PCI-SIG publishes (after line encoding): 250 MB/s per Gen1 lane,
    # 15.75 / 31.5 / 63 GB/s for Gen3/4/5 x16, 121 GB/s for Gen6 x16 in FLIT mode.
    (1, 1, 0.25, 0.17), (2, 1, 0.5, 0.35), (3, 16, 15.75, 13.5), (4, 16, 31.5, 27.5), (5, 16, 63.0, 55.0),
    (6, 16, 121.0, 108.0),
])
def test_published_figures(capsys, gen, width, published, usable_floor):
    got = calc_json(capsys, "--gen", str(gen), "--width", str(width))
    assert abs(got["encoded_gbps"] - published) < 0.02, got
    assert usable_floor < got["usable_gbps"] < published


def test_monotonic_in_every_knob(capsys):
    def usable(*args: str) -> float:
        return calc_json(capsys, *args)["usable_gbps"]

    base = ["--gen", "4", "--width", "8"]
    mps = [usable(*base, "--mps", str(m)) for m in (128, 256, 512, 1024, 2048, 4096)]
    assert mps == sorted(mps) and len(set(mps)) == 6  # a bigger payload amortises the overhead
    assert usable(*base, "--header", "16") < usable(*base)
    assert usable(*base, "--ecrc") < usable(*base)
    assert usable(*base, "--flow-control", "1") > usable(*base)


def test_quoted_gen5_x16_table_and_where_its_rounding_differs(capsys):
    got = calc_json(capsys, "--gen", "5", "--width", "16")
    want = expected(5, 16, 256, 12, False)
    # First principles: 64.00 -> 63.02 -> 58.03 -> 55.73; the quoted table rounds raw/encoded to the
    # same first decimal, but its TLP row (58.1) and so its last row (55.8) are 0.07 GB/s high.
    assert round(want["raw_gbps"], 1) == QUOTED[0]
    assert round(want["encoded_gbps"], 1) == QUOTED[1]
    assert round(want["tlp_gbps"], 1) != QUOTED[2] and round(want["usable_gbps"], 1) != QUOTED[3]
    layers = [d.split(":")[0] for d in got["quoted_table_differences"]]
    assert layers == ["tlp", "usable"]
    assert f"{want['tlp_gbps']:.2f}" in got["quoted_table_differences"][0]
    assert f"{want['usable_gbps']:.2f}" in got["quoted_table_differences"][1]
    # Only Gen5 x16 is compared with the quoted table.
    assert calc_json(capsys, "--gen", "5", "--width", "8")["quoted_table_differences"] == []


def test_table_output_shows_each_layer_and_the_quoted_table_notes(capsys):
    assert main(["calc", "--gen", "5", "--width", "16"]) == 0
    out = capsys.readouterr().out
    want = expected(5, 16, 256, 12, False)
    lines = {ln.split("  ")[0]: ln for ln in out.splitlines()}
    for layer, key in [("raw signalling", "raw_gbps"), ("after encoding", "encoded_gbps"),
                       ("after TLP overhead", "tlp_gbps"), ("usable (DLLP/FC)", "usable_gbps")]:
        assert f"{want[key]:.2f}" in lines[layer], (layer, out)
    assert "128b/130b" in out and "256/(256+4 framing+2 seq+12 hdr+4 LCRC+0 ECRC)" in out
    assert "quoted 58.1 GB/s" in out and "quoted 55.8 GB/s" in out
    assert "the commonly quoted table (64.0 \u2192 63.0 \u2192 58.1 \u2192 55.8 GB/s)" in out
    assert "seed" not in out
    assert main(["calc", "--gen", "1", "--width", "1", "--ecrc", "--header", "16"]) == 0
    out = capsys.readouterr().out
    assert "8b/10b" in out and "ECRC" in out and "quoted" not in out


@pytest.mark.parametrize(("args", "words"), [
    (["--gen", "7", "--width", "16"], ["--gen must be one of", "got 7"]),
    (["--gen", "0", "--width", "16"], ["--gen must be one of"]),
    (["--gen", "5", "--width", "3"], ["--width must be one of", "got 3"]),
    (["--gen", "5", "--width", "64"], ["--width must be one of"]),
    (["--gen", "5", "--width", "16", "--mps", "100"], ["--mps must be one of", "got 100"]),
    (["--gen", "5", "--width", "16", "--mps", "8192"], ["--mps must be one of"]),
    (["--gen", "5", "--width", "16", "--header", "14"], ["--header must be 12 (3DW) or 16 (4DW)"]),
    (["--gen", "5", "--width", "16", "--flow-control", "0"], ["--flow-control must be in (0, 1]"]),
    (["--gen", "5", "--width", "16", "--flow-control", "1.5"], ["--flow-control must be in (0, 1]"]),
    (["--gen", "five", "--width", "16"], ["--gen", "invalid int value"]),
    (["--width", "16"], ["the following arguments are required: --gen"]),
])
def test_bad_values_exit_2_with_a_clear_message(args, words):
    r = subprocess.run([*pcietax_cmd(), "calc", *args], env=pcietax_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_json_from_the_real_command():
    r = subprocess.run([*pcietax_cmd(), "calc", "--gen", "3", "--width", "4", "--json"], env=pcietax_env(),
                       capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(r.stdout)
    assert math.isclose(got["usable_gbps"], expected(3, 4, 256, 12, False)["usable_gbps"], rel_tol=1e-4)
