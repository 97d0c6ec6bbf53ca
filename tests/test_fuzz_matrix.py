"""Fuzzing the matrix loader: every bad matrix ends in exit status 2 with one line and no traceback.

Two parts: a table of hand-written bad matrices (YAML text, so parser errors are covered too),
run through the CLI entry function in this process; and a seeded mutation fuzzer that replaces
one value of a valid matrix with junk and requires either a valid matrix or a ConfigError,
never any other exception.
"""
import random

import pytest
import yaml
from conftest import matrix_dict

import bench.cli
from bench.cli import main
from bench.core.params import ConfigError
from bench.matrix import parse_matrix

OK = ("datasets: [digits]\nmodels: [tiny_cnn]\nrecipe: {epochs: 2}\n")
END = "attacks: [badnet]\ndefenses: [undefended]\n"

#: (id, YAML text); each must be refused before any work
BAD = [
    ("empty-file", ""),
    ("scalar", "42"),
    ("list-top", "- badnet\n- undefended\n"),
    ("unclosed-bracket", "attacks: [badnet\ndefenses: [undefended]\n"),
    ("tab-indent", "attacks:\n\t- badnet\ndefenses: [undefended]\n"),
    ("duplicate-key", "attacks: [badnet]\nattacks: [blend]\ndefenses: [undefended]\n"),
    ("bad-alias", "attacks: *nothing\ndefenses: [undefended]\n"),
    ("unknown-top", OK + "atacks: [badnet]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("no-attacks", OK + "defenses: [undefended]\n"),
    ("no-defenses", OK + "attacks: [badnet]\n"),
    ("attacks-null", OK + "attacks:\ndefenses: [undefended]\n"),
    ("attacks-empty", OK + "attacks: []\ndefenses: [undefended]\n"),
    ("defenses-empty", OK + "attacks: [badnet]\ndefenses: []\n"),
    ("datasets-empty", "datasets: []\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("models-empty", "models: []\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("seeds-empty", OK + "seeds: []\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("attack-number", OK + "attacks: [3]\ndefenses: [undefended]\n"),
    ("attack-nested-list", OK + "attacks: [[badnet]]\ndefenses: [undefended]\n"),
    ("attack-unknown", OK + "attacks: [badnett]\ndefenses: [undefended]\n"),
    ("attack-no-name", OK + "attacks: [{poison_ratio: 0.1}]\ndefenses: [undefended]\n"),
    ("attack-name-number", OK + "attacks: [{name: 7}]\ndefenses: [undefended]\n"),
    ("attack-bad-module", OK + "attacks: ['no_such_module_xyz:Thing']\ndefenses: [undefended]\n"),
    ("attack-not-a-class", OK + "attacks: ['os:system']\ndefenses: [undefended]\n"),
    ("ratio-string", OK + "attacks: [{name: badnet, poison_ratio: high}]\ndefenses: [undefended]\n"),
    ("ratio-above-1", OK + "attacks: [{name: badnet, poison_ratio: 1.5}]\ndefenses: [undefended]\n"),
    ("ratio-negative", OK + "attacks: [{name: badnet, poison_ratio: -0.1}]\ndefenses: [undefended]\n"),
    ("ratio-inf", OK + "attacks: [{name: badnet, poison_ratio: .inf}]\ndefenses: [undefended]\n"),
    ("ratio-nan", OK + "attacks: [{name: badnet, poison_ratio: .nan}]\ndefenses: [undefended]\n"),
    ("ratio-bool", OK + "attacks: [{name: badnet, poison_ratio: true}]\ndefenses: [undefended]\n"),
    ("ratio-list", OK + "attacks: [{name: badnet, poison_ratio: [0.1]}]\ndefenses: [undefended]\n"),
    ("target-out", OK + "attacks: [{name: badnet, target: 10}]\ndefenses: [undefended]\n"),
    ("target-negative", OK + "attacks: [{name: badnet, target: -1}]\ndefenses: [undefended]\n"),
    ("target-float", OK + "attacks: [{name: badnet, target: 1.5}]\ndefenses: [undefended]\n"),
    ("patch-too-big", OK + "attacks: [{name: badnet, patch_size: 100}]\ndefenses: [undefended]\n"),
    ("patch-zero", OK + "attacks: [{name: badnet, patch_size: 0}]\ndefenses: [undefended]\n"),
    ("style-unknown", OK + "attacks: [{name: badnet, style: plaid}]\ndefenses: [undefended]\n"),
    ("tact-cover-target", OK + "attacks: [{name: tact, cover_classes: [1, 7]}]\ndefenses: [undefended]\n"),
    ("tact-source-target", OK + "attacks: [{name: tact, source: 1}]\ndefenses: [undefended]\n"),
    ("tact-cover-scalar", OK + "attacks: [{name: tact, cover_classes: 5}]\ndefenses: [undefended]\n"),
    ("param-typo", OK + "attacks: [{name: badnet, patch_sise: 3}]\ndefenses: [undefended]\n"),
    ("sweep-empty", OK + "attacks: [{name: badnet, sweep: {}}]\ndefenses: [undefended]\n"),
    ("sweep-scalar", OK + "attacks: [{name: badnet, sweep: {poison_ratio: 0.1}}]\ndefenses: [undefended]\n"),
    ("sweep-bad-value", OK + "attacks: [{name: badnet, sweep: {poison_ratio: [0.1, 2]}}]\ndefenses: [undefended]\n"),
    ("sweep-unknown", OK + "attacks: [{name: badnet, sweep: {nope: [1]}}]\ndefenses: [undefended]\n"),
    ("label-number", OK + "attacks: [{name: badnet, label: 3}]\ndefenses: [undefended]\n"),
    ("defense-unknown", OK + "attacks: [badnet]\ndefenses: [undefend]\n"),
    ("defense-epochs-0", OK + "attacks: [badnet]\ndefenses: [{name: finetuning, epochs: 0}]\n"),
    ("defense-lr-negative", OK + "attacks: [badnet]\ndefenses: [{name: finetuning, lr: -0.1}]\n"),
    ("defense-bad-choice", OK + "attacks: [badnet]\ndefenses: [{name: cutmix, mode: sometimes}]\n"),
    ("recipe-list", "recipe: [1, 2]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-epochs-0", "recipe: {epochs: 0}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-epochs-negative", "recipe: {epochs: -3}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-epochs-float", "recipe: {epochs: 2.5}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-epochs-huge-string", "recipe: {epochs: '" + "9" * 400 + "'}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-batch-0", "recipe: {batch_size: 0}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-lr-0", "recipe: {lr: 0}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-lr-word", "recipe: {lr: fast}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-schedule", "recipe: {schedule: exponential}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-milestone", "recipe: {milestones: [0.5, 2]}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-unknown", "recipe: {epoch: 3}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-flip-string", "recipe: {flip: maybe}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("recipe-padding-negative", "recipe: {crop_padding: -1}\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("reserve-2", OK + "reserve_ratio: 2\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("reserve-word", OK + "reserve_ratio: lots\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("seed-string", OK + "seeds: [a]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("seed-negative", OK + "seeds: [-1]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("seed-huge", OK + "seeds: [99999999999999999999]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("seed-twice", OK + "seeds: [1, 1]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("dataset-unknown", "datasets: [cifar1O]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("dataset-limit-negative", "datasets: [{name: digits, train_limit: -5}]\n" + END),
    ("dataset-field-unknown", "datasets: [{name: digits, size: 8}]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("dataset-recipe-bad", "datasets: [{name: digits, recipe: {lr: -1}}]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("model-unknown", "models: [resnet-18]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("model-mapping", "models: [{name: tiny_cnn}]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("output-number", OK + "output: 5\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("name-list", OK + "name: [a]\nattacks: [badnet]\ndefenses: [undefended]\n"),
    ("evaluate-unknown", OK + "attacks: [badnet]\ndefenses: [undefended]\nevaluate: [magic]\n"),
    ("evaluate-twice", OK + END + "evaluate: [natural_backdoor, natural_backdoor]\n"),
    ("evaluate-budget", OK + END + "evaluate: [{name: natural_backdoor, budgets: [0]}]\n"),
    ("date-value", OK + "attacks: [{name: badnet, poison_ratio: 2024-01-01}]\ndefenses: [undefended]\n"),
    ("binary-value", OK + "attacks: [{name: badnet, poison_ratio: !!binary aGVsbG8=}]\ndefenses: [undefended]\n"),
]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a bad matrix reached execution")

    monkeypatch.setattr(bench.cli, "execute", refuse)


def _run_cli(tmp_path, capsys, text):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    code = main(["run", str(path), "--output", str(tmp_path / "runs"), "--report-dir", str(tmp_path / "rep"),
                 "--threads", "1"])
    return code, capsys.readouterr()


def test_the_table_is_large_enough():
    assert len(BAD) >= 40 and len({name for name, _ in BAD}) == len(BAD)


@pytest.mark.parametrize("name,text", BAD, ids=[n for n, _ in BAD])
def test_bad_matrix_one_line_exit_2(tmp_path, capsys, no_training, name, text):
    code, out = _run_cli(tmp_path, capsys, text)
    lines = out.err.strip().splitlines()
    assert code == 2, out.err
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err and out.out == ""
    assert len(lines[0]) < 600, lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/apply:subprocess.check_output [['touch', '{marker}']]",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!!python/object:bench.core.params.Range {{low: 1}}",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/tuple [1, 2]",
    "!python/object/apply:os.system ['touch {marker}']",
    "!<tag:yaml.org,2002:python/object/apply:os.system> ['touch {marker}']",
])
def test_no_yaml_tag_builds_python_objects(tmp_path, capsys, no_training, tag):
    marker = tmp_path / "pwned"
    text = OK + f"attacks: [{{name: badnet, poison_ratio: {tag.format(marker=marker)}}}]\ndefenses: [undefended]\n"
    code, out = _run_cli(tmp_path, capsys, text)
    assert not marker.exists()
    assert code == 2 and len(out.err.strip().splitlines()) == 1 and "Traceback" not in out.err, out.err
    assert "constructor" in out.err or "tag" in out.err


JUNK = [None, -1, 0, 1e309, float("nan"), True, "x", "1e-4", "", [], {}, [None], {"name": None}, [[[]]],
        {"a": {"b": 1}}, 2**70, -0.5, "badnet", ["badnet"], {"name": "badnet"}, "a" * 300, 3.5, "tiny_cnn"]


def _paths(obj, prefix=()):
    """Every (path, value) of a nested dict/list."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _replace(obj, path, value):
    if not path:
        return value
    obj = obj.copy()
    obj[path[0]] = value if len(path) == 1 else _replace(obj[path[0]], path[1:], value)
    return obj


@pytest.mark.slow
def test_mutation_fuzz_only_config_errors():
    """Replace one value (or add one key) of a rich valid matrix with junk, 1500 times (seeded):
    the loader either accepts it or raises ConfigError with a one-line message."""
    base = matrix_dict(
        seeds=[0, 1], reserve_ratio=0.05,
        attacks=["badnet", {"name": "tact", "cover_classes": [5, 7], "sweep": {"poison_ratio": [0.01, 0.02]}},
                 {"name": "blend", "alpha": 0.2, "label": "B"}],
        defenses=["undefended", {"name": "finetuning", "lr": 0.01}, {"name": "abl", "isolation_epochs": 2}],
        datasets=["digits", {"name": "digits", "train_limit": 500, "recipe": {"epochs": 3}}],
        evaluate=[{"name": "natural_backdoor", "budgets": [0.02, 0.06]}])
    paths = [p for p, _ in _paths(base) if p]
    rng = random.Random(0)
    refused = accepted = 0
    for _ in range(1500):
        path = rng.choice(paths)
        junk = rng.choice(JUNK)
        if rng.random() < 0.2 and isinstance(dict(_paths(base)).get(path[:-1]), dict):
            raw = _replace(base, path[:-1] + (rng.choice(["zzz", "name", "sweep", "label", "recipe"]),), junk)
        else:
            raw = _replace(base, path, junk)
        try:
            parse_matrix(yaml.safe_load(yaml.safe_dump(raw, allow_unicode=True)) if rng.random() < 0.5 else raw)
            accepted += 1
        except ConfigError as e:
            refused += 1
            assert "\n" not in str(e) and str(e), (path, junk, str(e))
    assert refused > 1000 and accepted > 0  # the fuzzer does reach both outcomes
