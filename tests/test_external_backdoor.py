"""A backdoored model trained elsewhere (weights plus its poisoned indices) runs the repair defenses."""
import json
import shutil

import pytest
from conftest import TINY_RECIPE, matrix_dict

from bench.core.params import ConfigError
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.store import Store, digest

RECIPE = {**TINY_RECIPE, "epochs": 4}


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    """'Another lab': a BadNet model trained with seed 5's poison draw, as a state dict and indices."""
    tmp = tmp_path_factory.mktemp("elsewhere")
    cell = parse_matrix(matrix_dict(seeds=[5], recipe=RECIPE)).cells[0]
    runner = Runner(Store(tmp / "runs"))
    row = runner.run_cell(cell)
    shutil.copy(runner.store.dir("backdoor", cell.backdoor_key) / "weights.safetensors",
                tmp / "model.safetensors")
    indices = json.loads((runner.store.dir("poison", digest(cell.poison_ident())) / "indices.json").read_text())
    (tmp / "poison.json").write_text(json.dumps({"poison_idx": indices["poison_idx"]}))
    return tmp, row, indices["poison_idx"]


def test_the_imported_model_replaces_training_and_its_indices_the_draw(elsewhere, tmp_path):
    src, row5, idx5 = elsewhere
    raw = matrix_dict(seeds=[0], recipe=RECIPE, defenses=["undefended", {"name": "finetuning", "epochs": 1}],
                      backdoored_models=[{"attack": 0, "weights": str(src / "model.safetensors"),
                                          "poison_indices": str(src / "poison.json")}])
    m = parse_matrix(raw)
    runner = Runner(Store(tmp_path))
    rows = {c.defense.key: runner.run_cell(c) for c in m.cells}
    assert (rows["undefended"]["acc"], rows["undefended"]["asr"]) == (row5["acc"], row5["asr"])
    poisoned, _ = runner.poisoned(m.cells[0])
    assert poisoned.poison_idx.tolist() == idx5  # seed 0's own draw differs; these are the model's
    meta = json.loads((runner.store.dir("backdoor", digest(m.cells[0].backdoor_ident())) / "meta.json").read_text())
    assert meta["external"].endswith("model.safetensors") and meta["epoch_equivalents"] == 0.0
    assert rows["finetuning"]["backdoor"]["asr"] == row5["asr"]  # the repair started from the imported model
    plain = parse_matrix(matrix_dict(seeds=[0], recipe=RECIPE)).cells[0]
    assert plain.backdoor_key != digest(m.cells[0].backdoor_ident())  # no cache confusion


@pytest.mark.parametrize("entry, message", [
    ({"attack": 3}, "backdoored_models[0].attack: expected the index of an entry in attacks"),
    ({"weights": "/nonexistent.pt"}, "backdoored_models[0].weights: '/nonexistent.pt' does not exist"),
    ({"seed": 7}, "backdoored_models[0].seed: 7; allowed: 0"),
    ({"weigths": "x"}, "backdoored_models[0].weigths: unknown field (did you mean 'weights'?)"),
])
def test_a_bad_entry_names_its_field(elsewhere, entry, message):
    src, _, _ = elsewhere
    base = {"attack": 0, "weights": str(src / "model.safetensors"), "poison_indices": str(src / "poison.json")}
    with pytest.raises(ConfigError) as e:
        parse_matrix(matrix_dict(backdoored_models=[{**base, **entry}]))
    assert message in str(e.value)


def test_indices_that_are_not_a_list_of_indices_are_refused(elsewhere, tmp_path):
    src, _, _ = elsewhere
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"poison_idx": [1, 1, 2]}))
    with pytest.raises(ConfigError, match="poison_idx lists an index twice"):
        parse_matrix(matrix_dict(backdoored_models=[{"attack": 0, "weights": str(src / "model.safetensors"),
                                                     "poison_indices": str(bad)}]))
