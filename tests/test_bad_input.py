"""Bad input fails before any work with one line; numbers are read as people write them."""
import re

import pytest

from bench.matrix import load_matrix, parse_matrix, parse_yaml
from bench.registry import ConfigError
from conftest import REPO, matrix_dict


def _readme_matrix_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Matrices"):]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_readme_matrix_example_loads(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(_readme_matrix_example())
    m = load_matrix(path)
    assert m.cells, "the README's example expands to no cell"
    assert {c.recipe.weight_decay for c in m.cells} == {1e-4}


@pytest.mark.parametrize("written,value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("5e3", 5000.0), ("+2.5e-1", 0.25),
                                           (".5e-2", 0.005), ("0.0005", 5e-4), ("3", 3.0)])
def test_numbers_as_people_write_them(tmp_path, written, value):
    path = tmp_path / "m.yaml"
    path.write_text(f"datasets: [digits]\nrecipe: {{weight_decay: {written}}}\nreserve_ratio: {written if value <= 1 else 0.1}\n"
                    f"attacks: [{{name: blend, alpha: {written if value <= 1 else 0.2}}}]\ndefenses: [undefended]\n")
    cell = load_matrix(path).cells[0]
    assert cell.recipe.weight_decay == value and isinstance(cell.recipe.weight_decay, float)
    if value <= 1:
        assert cell.attack.alpha == value and cell.reserve_ratio == value


def test_quoted_scientific_number_in_a_python_dict():
    # a matrix built in Python from YAML 1.1 output still has the string
    cell = parse_matrix(matrix_dict(recipe={"weight_decay": "1e-4"}, reserve_ratio="2e-2")).cells[0]
    assert cell.recipe.weight_decay == 1e-4 and cell.reserve_ratio == 0.02


def test_integers_stay_integers():
    assert parse_yaml("a: 10\nb: 1_000")["a"] == 10
    with pytest.raises(ConfigError, match=r"^recipe\.epochs: expected an integer"):
        parse_matrix(matrix_dict(recipe={"epochs": "1e1"}))
