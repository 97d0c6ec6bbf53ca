"""``--set`` overrides and ``bench show``: the same validation and messages as the YAML."""
import pytest
from conftest import matrix_dict

from bench.cli import main, show_text
from bench.core.params import ConfigError
from bench.matrix import apply_overrides, parse_matrix


def test_set_overrides_fields_entries_and_bare_names():
    raw = matrix_dict(defenses=["undefended", "abl"], attacks=["badnet", {"name": "blend", "alpha": 0.2}])
    out = apply_overrides(raw, ["recipe.epochs=3", "defenses[1].retrain_epochs=2", "attacks[1].alpha=1e-1",
                                "seeds=[0, 1]", "datasets[0]={name: digits, train_limit: 500}"])
    assert raw["defenses"][1] == "abl"  # the loaded YAML itself is untouched
    m = parse_matrix(out)
    assert {c.recipe.epochs for c in m.cells} == {3}
    assert {c.defense.retrain_epochs for c in m.cells if c.defense.key == "abl"} == {2}
    assert {c.attack.alpha for c in m.cells if c.attack.key == "blend"} == {0.1}
    assert {c.seed for c in m.cells} == {0, 1} and {c.dataset.train_limit for c in m.cells} == {500}


@pytest.mark.parametrize("override, message", [
    ("recipe.epochs=0", "recipe.epochs: 0 is out of range; allowed: >= 1"),
    ("defenses[1].lrr=0.1", "defenses[1].lrr: unknown parameter of FineTuning (did you mean 'lr'?)"),
    ("defenses[7].lr=0.1", "--set defenses[7].lr: defenses has 2 entries; no index 7"),
    ("recipe.epochs", "--set recipe.epochs: expected PATH=VALUE"),
    ("recipe..epochs=1", "--set recipe..epochs: '' is not a field name"),
    ("recipe.epochs=[1", "--set recipe.epochs' is not valid YAML"),
])
def test_a_bad_override_is_one_line_naming_the_field(override, message):
    raw = matrix_dict(defenses=["undefended", "finetuning"])
    with pytest.raises(ConfigError) as e:
        parse_matrix(apply_overrides(raw, [override]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_set_on_the_command_line_exits_2_with_the_message(capsys):
    assert main(["run", "--set", "recipe.lr=-1", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: recipe.lr: -1.0 is out of range; allowed: > 0"


def test_show_lists_every_field_with_default_range_and_meaning():
    text = show_text("badnet")
    assert text.startswith("attack badnet: ")
    assert "  poison_ratio: float = 0.05  (allowed: [0, 1])" in text
    assert "fraction of the training set that is poisoned" in text
    with pytest.raises(ConfigError, match="did you mean 'abl'"):
        show_text("ab")
