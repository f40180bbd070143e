"""Run a function as an unprivileged user, for permission-denied paths (root reads anything).

The child is forked, drops to nobody (setgroups, setgid, setuid: irreversible), runs the function
and sends its pickled result, or the exception, back through a pipe."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
NOBODY = 65534


def world_traversable_dir() -> Path:
    """A temp dir nobody can reach (pytest's tmp_path sits under a 0700 directory)."""
    d = Path(tempfile.mkdtemp(prefix="pcietax-test-", dir="/tmp"))
    d.chmod(0o755)
    return d


def run_as_nobody(fn: Callable[[], T]) -> T:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload: Any = ("ok", fn())
        except BaseException as e:
            payload = ("err", e)
        try:
            data = pickle.dumps(payload)
        except Exception as e:
            data = pickle.dumps(("err", RuntimeError(f"unpicklable result: {e}")))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "err":
        raise value
    return value
