"""Shared test plumbing: how to run the pcietax CLI from this tree, free loopback ports, root checks."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def pcietax_cmd() -> list[str]:
    """The CLI of *this* tree (not whatever pcietax is installed), for subprocess tests."""
    return [sys.executable, "-m", "pcietax"]


def pcietax_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "exporter"), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_node(tmp_path):
    from helpers.fakenode import FakeNode

    return FakeNode(tmp_path)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (real kernel probes / namespaces)")
