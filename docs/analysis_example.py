"""Load a matrix's results into pandas and pivot ACC/ASR by attack x defense.

    python docs/analysis_example.py matrices/cifar10-cpu-core.yaml --output runs

Every parameter is a column (``attack.poison_ratio``, ``defense.lr``, ``recipe.epochs``, ...), so a
sweep is a ``groupby`` away; see ``bench/results.py`` for the full list of columns.
"""
import argparse

import pandas as pd

from bench.results import load

p = argparse.ArgumentParser()
p.add_argument("source", help="a matrix YAML or a store folder")
p.add_argument("--output", help="the matrix's store, if not its own 'output'")
args = p.parse_args()

df = load(args.source, output=args.output)
print(f"{len(df)} cells, {df.shape[1]} columns")

# mean over seeds, in percent, attacks down and defenses across
table = df.pivot_table(index="attack_name", columns="defense_name", values=["acc", "asr"], aggfunc="mean") * 100
with pd.option_context("display.width", 200, "display.precision", 1):
    print(table.round(1).to_string())

# how much each defense removed, against the undefended model of the same poisoned set
df["asr_removed"] = 100 * (df["undefended.asr"] - df["asr"])
print(df.groupby("defense_name")["asr_removed"].mean().round(1).sort_values(ascending=False).to_string())
