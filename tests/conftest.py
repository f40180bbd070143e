"""Shared test plumbing: how to run the pcietax CLI from this tree, free loopback ports, root checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# One definition of how to run this tree's CLI and find a port, shared with bench/.
from helpers.exporters import free_port, pcietax_cmd, pcietax_env  # noqa: E402

__all__ = ["REPO", "free_port", "needs_root", "pcietax_cmd", "pcietax_env"]


@pytest.fixture
def fake_node(tmp_path):
    from helpers.fakenode import FakeNode

    return FakeNode(tmp_path)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (real kernel probes / namespaces)")
