"""Turn raw device counters into counters that never go backwards.

A raw value below the previous one is either a *wrap* (a narrow counter passed 2**bits) or a
*reset* (driver reload, device re-enumerated, a restarted eBPF program). Both are absorbed: the
exported value keeps rising by the true increase, and each event is counted so the operator can
see it (``pcietax_source_resets_total``). Pure arithmetic, no I/O.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

# A wrap is only plausible when the previous value was in the top part of the counter's range
# and the new one near the bottom; otherwise a drop is a reset.
_WRAP_WINDOW = 0.5


@dataclass
class _State:
    last_raw: float
    offset: float


class CounterAbsorber:
    """Per-series state: key -> (last raw value, offset added to every later raw value)."""

    def __init__(self) -> None:
        self._state: dict[Hashable, _State] = {}
        self.wraps = 0
        self.resets = 0

    def update(self, key: Hashable, raw: float, bits: int | None = None) -> float:
        """Feed one raw reading; return the monotonic value (first reading is taken as-is)."""
        st = self._state.get(key)
        if st is None:
            self._state[key] = _State(raw, 0.0)
            return raw
        if raw < st.last_raw:
            if bits is not None and _is_wrap(st.last_raw, raw, bits):
                st.offset += float(2**bits)
                self.wraps += 1
            else:
                # After a reset the counter restarted at zero: everything it now shows is new.
                st.offset += st.last_raw
                self.resets += 1
        st.last_raw = raw
        return raw + st.offset

    def value(self, key: Hashable) -> float | None:
        st = self._state.get(key)
        return None if st is None else st.last_raw + st.offset

    def forget(self, key: Hashable) -> None:
        self._state.pop(key, None)

    def __len__(self) -> int:
        return len(self._state)


def _is_wrap(last: float, raw: float, bits: int) -> bool:
    span = float(2**bits)
    return last >= span * _WRAP_WINDOW and raw < span * (1 - _WRAP_WINDOW) and last < span
