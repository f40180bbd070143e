"""CounterAbsorber: raw device counters in, counters that never go backwards out."""

from __future__ import annotations

import itertools

from pcietax.counters import CounterAbsorber


def test_first_reading_is_taken_as_is_and_rises():
    a = CounterAbsorber()
    assert a.update("k", 100) == 100
    assert a.update("k", 150) == 150
    assert a.update("k", 150) == 150
    assert (a.wraps, a.resets) == (0, 0)


def test_32_bit_wrap_adds_the_true_increase():
    a = CounterAbsorber()
    top = 2**32 - 10
    a.update("k", top, bits=32)
    # 10 to the top, then 5 past zero: the true increase is 15.
    assert a.update("k", 5, bits=32) == top + 15
    assert a.update("k", 105, bits=32) == top + 115
    assert (a.wraps, a.resets) == (1, 0)


def test_drop_without_bits_is_a_reset():
    a = CounterAbsorber()
    a.update("k", 2**32 - 10)
    # A 64-bit counter cannot wrap here: the driver reloaded and counts from zero again.
    assert a.update("k", 5) == 2**32 - 10 + 5
    assert (a.wraps, a.resets) == (0, 1)


def test_drop_from_low_in_range_is_a_reset_even_with_bits():
    a = CounterAbsorber()
    a.update("k", 1000, bits=32)
    assert a.update("k", 10, bits=32) == 1010
    assert (a.wraps, a.resets) == (0, 1)


def test_small_width_wrap_and_repeated_wraps():
    a = CounterAbsorber()
    a.update("k", 200, bits=8)
    assert a.update("k", 10, bits=8) == 266  # 56 to the top, 10 past it
    assert a.update("k", 250, bits=8) == 506
    assert a.update("k", 3, bits=8) == 515
    assert a.wraps == 2


def test_series_are_independent_and_forgettable():
    a = CounterAbsorber()
    a.update("a", 10)
    a.update("b", 20)
    a.update("a", 1)
    assert a.value("a") == 11 and a.value("b") == 20 and len(a) == 2
    a.forget("a")
    assert a.value("a") is None
    assert a.update("a", 3) == 3  # a forgotten series starts over


def test_never_backwards_over_a_noisy_sequence():
    a = CounterAbsorber()
    raw = [5, 9, 2, 2, 7, 0, 0, 3, 1, 100, 50]
    out = [a.update("k", r) for r in raw]
    assert all(x <= y for x, y in itertools.pairwise(out))
    # Every reset counts from zero: the total is the sum of increases plus post-reset values.
    assert out[-1] == 5 + 4 + 2 + 5 + 0 + 3 + 1 + 99 + 50
