"""The one /proc/PID/maps parser (pcietax.procmaps), on the kernel's exact line format
(fs/proc/task_mmu.c show_map_vma: start-end perms offset dev inode, padding, path) and on hostile
text: any user can map a file whose name is not UTF-8 or contains spaces."""

from __future__ import annotations

import ctypes
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from pcietax import procmaps

MAPS = (
    b"55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1311                       /usr/bin/python3.11\n"
    b"7f1c30000000-7f1c30028000 r--p 00000000 08:01 2                          /usr/lib/libc.so.6\n"
    b"7f1c30028000-7f1c301bd000 r-xp 00028000 08:01 2                          /usr/lib/libc.so.6\n"
    b"7f1c40000000-7f1c40001000 rw-p 00000000 00:00 0 \n"
    b"7f1c50000000-7f1c50001000 r--p 00000000 08:01 9                          /tmp/my lib \xff\xfe.so\n"
    b"7f1c60000000-7f1c60001000 r--p 00000000 08:01 10                         /tmp/gone.so (deleted)\n"
    b"7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n"
)


def test_fields_and_paths_in_the_kernel_layout():
    rows = list(procmaps.parse_maps(MAPS))
    assert len(rows) == 7
    libc_text = procmaps.Mapping(0x7F1C30028000, 0x7F1C301BD000, b"r-xp", 0x28000, b"/usr/lib/libc.so.6")
    assert rows[2] == libc_text
    assert rows[3].path == b"" and not rows[3].is_file  # anonymous: no path column
    assert rows[4].path == b"/tmp/my lib \xff\xfe.so"  # spaces kept, bytes kept
    assert os.fsencode(rows[4].fspath) == rows[4].path  # round-trips to the same file name
    assert rows[5].deleted and rows[6].path == b"[stack]" and not rows[6].is_file


def test_mapped_files_are_distinct_without_deleted_or_special_ones():
    files = procmaps.mapped_files(procmaps.parse_maps(MAPS))
    assert files == ["/usr/bin/python3.11", "/usr/lib/libc.so.6", os.fsdecode(b"/tmp/my lib \xff\xfe.so")]


def test_module_of_gives_the_offset_zero_base():
    rows = list(procmaps.parse_maps(MAPS))
    assert procmaps.module_of(0x7F1C30028000 + 0x100, rows) == ("/usr/lib/libc.so.6", 0x7F1C30000000)
    assert procmaps.module_of(0x7F1C40000010, rows) is None  # anonymous
    assert procmaps.module_of(0x1000, rows) is None
    only_text = [r for r in rows if r.offset != 0]
    assert procmaps.module_of(0x7F1C30028000, only_text) is None  # no offset-0 mapping: no base


def test_malformed_lines_are_skipped_not_raised():
    bad = (b"\n"
           b"garbage\n"
           b"zz-10 r--p 00000000 08:01 1 /x\n"  # not hex
           b"2000-1000 r--p 00000000 08:01 1 /backwards\n"
           b"1000 r--p 00000000 08:01 1 /no-dash\n"
           + b"1" * 400 + b"-" + b"2" * 400 + b" r--p 0 08:01 1 /huge\n"  # 400 digits: fine, kept
           + b"1000-2000 r--p 00000000 08:01 1 /ok\n")
    rows = list(procmaps.parse_maps(bad))
    assert [r.path for r in rows] == [b"/huge", b"/ok"]


def test_a_gone_process_has_no_mappings_and_reads_are_capped(tmp_path):
    assert procmaps.process_maps(tmp_path, 42) == []
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "maps").write_bytes(MAPS * 1000)
    assert len(procmaps.read_maps(tmp_path / "7" / "maps", limit=len(MAPS))) == len(MAPS)
    assert len(procmaps.process_maps(tmp_path, 7)) == 7000


def test_this_process_libc_function_is_in_libc():
    """Against the real kernel: the address of libc's labs lies in a libc mapping of ours."""
    addr = ctypes.cast(ctypes.CDLL("libc.so.6").labs, ctypes.c_void_p).value
    found = procmaps.module_of(addr, procmaps.process_maps("/proc", "self"))
    assert found is not None and "libc" in os.path.basename(found[0]) and found[1] <= addr


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=120), st.sampled_from(MAPS.splitlines())), max_size=30))
def test_no_text_makes_the_parser_raise(lines):
    text = b"\n".join(lines)
    rows = list(procmaps.parse_maps(text))
    procmaps.mapped_files(rows)
    procmaps.module_of(0x7F1C30028000, rows)
