"""What an adopter checks before taking the project: the license is the full Apache-2.0 text the
metadata names, the package metadata has its URLs and valid classifiers, nvidia-ml-py is a core
dependency (never the deprecated `pynvml`), and the changelog has the version being released."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite runs on 3.11
    tomllib = pytest.importorskip("tomli")

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_license_is_the_full_apache_2_text():
    text = (REPO / "LICENSE").read_text()
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # Every section of the terms, and the appendix, not a one-line pointer to the license.
    for n, title in enumerate(("Definitions", "Grant of Copyright License", "Grant of Patent License",
                               "Redistribution", "Submission of Contributions", "Trademarks",
                               "Disclaimer of Warranty", "Limitation of Liability",
                               "Accepting Warranty or Additional Liability"), start=1):
        assert re.search(rf"^\s*{n}\. {title}\.", text, re.M), title
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert len(text.split()) > 1500


def test_nvml_binding_is_a_core_dependency():
    deps = [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() for d in PROJECT["dependencies"]]
    assert "nvidia-ml-py" in deps
    assert "pynvml" not in deps  # the deprecated shim, a different project
    assert "bcc" not in deps  # the unrelated PyPI lattice library; BCC comes from the distribution
    assert PROJECT["optional-dependencies"]["nvml"] == []  # old install lines keep working


def test_urls_and_classifiers():
    trove = pytest.importorskip("trove_classifiers")
    urls = PROJECT["urls"]
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= urls.keys()
    assert all(u.startswith("https://") for u in urls.values())
    unknown = [c for c in PROJECT["classifiers"] if c not in trove.classifiers]
    assert not unknown, unknown
    # The Python versions claimed start at requires-python.
    lowest = PROJECT["requires-python"].removeprefix(">=")
    versions = [c.rsplit(" ", 1)[1] for c in PROJECT["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and min(versions, key=lambda v: tuple(map(int, v.split(".")))) == lowest
    assert "Operating System :: POSIX :: Linux" in PROJECT["classifiers"]


def test_changelog_has_this_version_and_links():
    text = (REPO / "CHANGELOG.md").read_text()
    version = PROJECT["version"]
    assert "## [Unreleased]" in text and f"## [{version}]" in text
    for ref in re.findall(r"^## \[([^\]]+)\]", text, re.M):
        assert re.search(rf"^\[{re.escape(ref)}\]: https://", text, re.M), f"no link for [{ref}]"
    assert PROJECT["urls"]["Changelog"].endswith("/CHANGELOG.md")
