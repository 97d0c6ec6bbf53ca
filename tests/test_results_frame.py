"""``bench.results.load``: one row per cell, parameters as columns, the undefended baseline beside."""
import pandas as pd
import pytest
import yaml
from conftest import TINY_RECIPE, matrix_dict

from bench.matrix import parse_matrix
from bench.report import write_results
from bench.results import load
from bench.runner import Runner
from bench.store import Store


@pytest.mark.slow
def test_load_flattens_parameters_and_joins_the_undefended_baseline(tmp_path):
    raw = matrix_dict(attacks=[{"name": "badnet", "sweep": {"poison_ratio": [0.05, 0.1]}}],
                      defenses=["undefended", "finetuning", "test_isolation:Retrain"],
                      recipe={**TINY_RECIPE, "epochs": 3}, output=str(tmp_path / "runs"))
    m = parse_matrix(raw)
    runner = Runner(Store(tmp_path / "runs"))
    rows = {(c.attack.poison_ratio, c.defense.key): runner.run_cell(c) for c in m.cells}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))

    df = load(path)
    assert len(df) == 6 and sorted(df["attack.poison_ratio"].unique()) == [0.05, 0.1]
    assert set(df["recipe.epochs"]) == {3} and "defense.lr" in df.columns  # FineTuning's parameter
    for (ratio, key), row in rows.items():
        got = df[(df["attack.poison_ratio"] == ratio) & (df["defense"] == key)].iloc[0]
        assert got["acc"] == row["acc"] and got["asr"] == row["asr"]
        # every defense, also one trained from scratch, has the undefended model of its poisoned set beside it
        assert got["undefended.asr"] == rows[(ratio, "undefended")]["asr"]
    assert load(tmp_path / "runs").shape[0] == 6  # a store folder: every verified result

    out = tmp_path / "rep"
    out.mkdir()
    paths = write_results(list(rows.values()), out)
    assert [p.name for p in paths[:2]] == ["results.csv", "results.jsonl"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


def test_an_older_result_without_its_test_slice_still_matches_its_baseline():
    from bench.results import frame

    common = {"dataset": "cifar10", "train_limit": 20000, "model": "small_cnn", "attack": "blend", "seed": 0,
              "attack_params": {"poison_ratio": 0.05}, "recipe": {"epochs": 10}}
    old_base = {**common, "defense": "undefended", "acc": 0.8, "asr": 0.95, "ra": 0.04}  # no test_limit recorded
    scratch = {**common, "test_limit": 5000, "defense": "advrbd", "acc": 0.77, "asr": 0.9, "ra": 0.1}
    other = {**common, "test_limit": 5000, "seed": 1, "defense": "advrbd", "acc": 0.7, "asr": 0.5, "ra": 0.4}
    df = frame([old_base, scratch, other]).set_index("seed", append=True)
    assert df.loc[(1, 0), "undefended.asr"] == 0.95 and df.loc[(1, 0), "der"] == pytest.approx((0.05 - 0.03 + 1) / 2)
    assert pd.isna(df.loc[(2, 1), "undefended.asr"])  # another seed is another poisoned set
