"""The README's metrics reference is the catalog's, and its quick start names real scripts."""

import importlib.util
import re

from conftest import REPO


def _update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "scripts/update_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_metrics_reference_matches_catalog():
    readme = (REPO / "README.md").read_text()
    assert _update_readme().render(readme) == readme, "run: python scripts/update_readme.py"


def test_quick_start_commands_exist_and_ci_calls_the_test_command():
    readme = (REPO / "README.md").read_text()
    cmds = re.findall(r"^(scripts/\S+)  ", readme, re.M)
    assert cmds == ["scripts/serve.sh", "scripts/test.sh"]
    for c in cmds:
        assert (REPO / c).stat().st_mode & 0o111, f"{c} is not executable"
    assert "scripts/test.sh" in (REPO / ".ci/run").read_text()
