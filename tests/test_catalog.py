"""catalog.py is the one home of family names (issue 11, "one home for names"): no other module
spells a family name, and the catalog says which `direction` values each family may carry."""

from __future__ import annotations

import re
from pathlib import Path

from pcietax import catalog

PKG = Path(catalog.__file__).parent
NAME = re.compile(r"""["'](pcietax_[a-z0-9_]+)["']""")


def test_no_module_but_the_catalog_spells_a_family_name():
    offenders = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel == "catalog.py":
            continue
        names = {m for m in NAME.findall(path.read_text()) if m in catalog.FAMILIES}
        if names:
            offenders[rel] = sorted(names)
    assert offenders == {}


def test_every_constant_names_a_family_and_back():
    consts = {v for k, v in vars(catalog).items() if k.isupper() and isinstance(v, str)
              and v.startswith("pcietax_")}
    assert consts == set(catalog.FAMILIES)


def test_direction_is_ingress_egress_except_where_the_catalog_says_why():
    with_direction = {n for n, f in catalog.FAMILIES.items() if "direction" in f.labels}
    assert set(catalog.DIRECTION_EXCEPTIONS) <= with_direction
    for name in with_direction:
        vals = catalog.direction_values(name)
        if name in catalog.DIRECTION_EXCEPTIONS:
            assert vals == ("rx", "tx") and catalog.DIRECTION_EXCEPTIONS[name][1]
        else:
            assert vals == ("ingress", "egress")


def test_the_scope_rule_is_in_the_help_of_everything_that_shows_the_ratio():
    for name in (catalog.TAX_RATIO, catalog.USEFUL_BYTES):
        assert catalog.SCOPE_RULE in catalog.FAMILIES[name].help


def test_check_labels():
    catalog.check_labels(catalog.HOP_MEASURED, [("hop", "upi")])
    for bad in ([("hop", "upi"), ("x", "1")], []):
        try:
            catalog.check_labels(catalog.HOP_MEASURED, bad)
        except catalog.LabelSetMismatch:
            continue
        raise AssertionError(f"{bad} passed")
