"""The run config users see (keys, defaults, error messages) is unchanged by restructuring.

``tests/unit/data/config_surface.json`` is the surface as it stood; see
:mod:`tests.unit.config_surface` for what it holds and how to regenerate it deliberately.
"""

from __future__ import annotations

import json

from tests.unit.config_surface import GOLDEN, RULES, fresh_surface


def test_every_key_default_and_message_is_unchanged() -> None:
    golden = json.loads(GOLDEN.read_text())
    now = fresh_surface()
    assert sorted(now["keys"]) == sorted(golden["keys"]), "config keys added or removed"
    for key, want in golden["keys"].items():
        assert now["keys"][key] == want, key
    assert now["rules"] == golden["rules"]
    assert now["implied"] == golden["implied"]


def test_every_rule_case_is_refused() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert set(golden["rules"]) == set(RULES)
    accepted = [name for name, msg in golden["rules"].items() if msg == "<accepted>"]
    assert not accepted, f"cases meant to break a rule were accepted: {accepted}"
    for key, entry in golden["keys"].items():
        assert entry["errors"], key
        assert all(msg != "<accepted>" and "config key" in msg for msg in entry["errors"].values()), key
