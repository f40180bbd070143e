"""Durations and sizes on the command line: accepted spellings and the errors that name the fix."""

import argparse

import pytest

from pcietax.argtypes import duration, size, size_or_zero


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
