"""Published numbers our cells are compared with, shipped in ``bench/reference``: the AdvrBD
paper's tables and BackdoorBench's CIFAR-10 leaderboard, with the training regime each assumes."""
from __future__ import annotations

import csv
import io
from importlib import resources


def paper_numbers() -> dict[tuple[str, str, str], tuple[float, float]]:
    text = resources.files("bench").joinpath("reference/advrbd_paper_tables.csv").read_text()
    out = {}
    for r in csv.DictReader(io.StringIO(text)):
        out[(r["dataset"], r["attack"], r["defense"])] = (float(r["acc"]), float(r["asr"]))
    return out


#: our names -> BackdoorBench leaderboard names (models, attacks, defenses); unlisted names have no row there
BB_MODELS = {"preact_resnet18": "PreActResNet-18"}


BB_ATTACKS = {"BadNet": "BadNet", "Blend": "Blended", "SIG": "SIG", "WaNet": "WaNet"}


BB_DEFENSES = {"No Defense": "No Defense", "FineTuning": "FT", "FinePruning": "FP", "ABL": "ABL", "CLP": "CLP",
               "DBR": "D-BR"}


def leaderboard() -> dict[tuple, tuple[float, float, float]]:
    """BackdoorBench's CIFAR-10 leaderboard (shipped in ``bench/reference``): (dataset, model, poison
    ratio, attack, defense) -> (ACC, ASR, RA) in %."""
    text = resources.files("bench").joinpath("reference/backdoorbench_leaderboard_cifar10.csv").read_text()
    def value(v: str) -> float:  # the leaderboard writes N/A for runs it does not have
        return float("nan") if v.strip() in ("", "N/A") else float(v)

    return {(r["dataset"], r["model"], float(r["pratio"]), r["attack"], r["defense"]):
            (value(r["acc"]), value(r["asr"]), value(r["ra"])) for r in csv.DictReader(io.StringIO(text))}


#: the training regime of the AdvrBD paper's tables: (model, at least this many epochs)
PAPER_REGIME = ("resnet18", 100)


#: BackdoorBench's leaderboard rows we compare with: (model, epochs)
BB_REGIME = ("preact_resnet18", 100)


def regime(row: dict, theirs: tuple[str, int]) -> str:
    """``same`` when the cell's model and training length are the reference's, else what differs,
    so that a reader never compares, say, a fastnet number with a ResNet-18 one silently."""
    model, epochs = row.get("model"), (row.get("recipe") or {}).get("epochs")
    if model == theirs[0] and (epochs is None or epochs >= theirs[1]):
        return "same"
    ours = f"{model}" + (f", {epochs} ep." if epochs is not None else "")
    return f"differs: {ours}"


PAPER_NOTE = ("the paper trains ResNet-18 for 100+ epochs; Regime says where our cell differs (model, epochs). "
              "Its defended CIFAR-10 numbers are all multiples of 1/910 while its undefended ones are multiples of "
              "1/1000 or 1/10000, so its defended ACC is very likely measured on a test subset without the target "
              "class: ACC (ours) is therefore our ACC on non-target test images for a defended cell and our ACC on "
              "all test images for the undefended one")
