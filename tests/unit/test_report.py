"""The report's dilemma plot and tables, from hand-made results."""

from __future__ import annotations

import pytest

from unpact.errors import UnpactError
from unpact.report import dilemma_svg
from unpact.results import columns, other_columns
from unpact.run import load_config


def _results(attacks):
    method = {
        "destructive_retain": 0.1,
        "destructive_general": 0.2,
        "recovery": {a: 0.5 for a in [*attacks, "any"]},
    }
    return {"attacks": attacks, "methods": {"ga": method}}


def test_the_dilemma_plot_shows_recovery_by_any_attack_unless_told():
    several = _results(["focus_on_key", "probab"])
    assert "recovery rate, any attack" in dilemma_svg(several)
    assert "recovery rate, PROBAB" in dilemma_svg(several, attack="probab")
    assert "recovery rate, FocusOnKey" in dilemma_svg(_results(["focus_on_key"]))


def test_report_dilemma_attack_must_be_an_attack_of_the_run():
    base = {"methods": [{"method": "ga"}], "attacks": [{"name": "probab"}]}
    assert load_config(base | {"report": {"dilemma_attack": "any"}}).report.dilemma_attack == "any"
    with pytest.raises(UnpactError, match=r"report\.dilemma_attack: 'focus_on_key' is not one"):
        load_config(base | {"report": {"dilemma_attack": "focus_on_key"}})


def test_the_report_table_splits_joined_columns_and_keeps_the_rest_apart():
    table = [c.metrics[0].name for c in columns(["probab"], split=True) if c.attack is None]
    assert table[:3] == ["forget_acc_before", "forget_acc_after", "forgotten"]
    rest = [c.metrics[0].name for c in other_columns(["probab"])]
    assert "retain_acc_after" in rest and "forget_acc_after" not in rest
    assert not set(table) & set(rest)
