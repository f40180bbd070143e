"""Durations and sizes on the command line: accepted spellings and the errors that name the fix."""

import argparse

import pytest

from pcietax.argtypes import duration, duration_between, size, size_or_zero


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10), ("500ms", 0.5), ("1m", 60), ("2h", 7200), ("3", 3)]
)
def test_durations(text, seconds):
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "nbytes"), [("4096", 4096), ("512KiB", 512 << 10), ("64MiB", 64 << 20),
                                              ("1M", 1 << 20), ("2GiB", 2 << 30), ("1.5k", 1536)])
def test_sizes(text, nbytes):
    assert size(text) == nbytes


@pytest.mark.parametrize("bad", ["", "ten", "10x", "-1s", "1d"])
def test_bad_duration_says_what_a_duration_looks_like(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
        duration(bad)


def test_zero_duration_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="must be positive"):
        duration("0s")


@pytest.mark.parametrize("bad", ["", "lots", "12PB", "MiB"])
def test_bad_size_says_what_a_size_looks_like(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
        size(bad)


def test_zero_size_only_where_allowed():
    assert size_or_zero("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="must be positive"):
        size("0")


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", "1e400", "1" * 400, "1_000", "0x10", "١٢"])
def test_non_finite_and_absurd_sizes_are_refused(bad):
    """Before, float('inf') reached int() and raised OverflowError: a traceback and exit 1."""
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
        size_or_zero(bad)


def test_sizes_above_one_exbibyte_are_too_large():
    with pytest.raises(argparse.ArgumentTypeError, match="too large"):
        size_or_zero("2000000Ti")
    assert size_or_zero("1024Ti") == 1 << 50


@pytest.mark.parametrize("bad", ["99999999999h", "1" * 29 + "s", "87601h"])
def test_durations_that_no_wait_can_take_are_refused(bad):
    """Before, 99999999999h reached threading.Event.wait, whose OverflowError killed the
    collection thread: the first cycle was served forever."""
    with pytest.raises(argparse.ArgumentTypeError, match="too long"):
        duration(bad)


@pytest.mark.parametrize("bad", ["1" * 400 + "s", "inf", "nan", "1e3s"])
def test_non_numbers_are_not_durations(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a duration"):
        duration(bad)


def test_bounded_durations_name_the_range():
    interval = duration_between(0.01, 3600)
    assert interval("1h") == 3600 and interval("10ms") == pytest.approx(0.01)
    for bad in ("2h", "5ms"):
        with pytest.raises(argparse.ArgumentTypeError, match="out of range: give 10ms to 1h"):
            interval(bad)
