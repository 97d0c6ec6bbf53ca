import pytest
"""A defense cannot corrupt other cells nor reach the ground truth through its context."""
import functools
import types
from dataclasses import dataclass

import torch
from conftest import TINY_RECIPE, matrix_dict

from bench.core.attack import PoisonedSet, TriggeredTest
from bench.core.data import Dataset
from bench.core.defense import Defense, DefenseContext, Needs, Outcome
from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.store import Store


@dataclass
class Vandal(Defense):
    """Damages everything it is handed in place, then returns an untrained model."""


    def needs(self):
        return Needs(backdoored_model=True, clean_data=True)


    def run(self, ctx: DefenseContext) -> Outcome:
        ctx.train.x.zero_()
        ctx.train.y.fill_(0)
        ctx.clean_reserve.x.fill_(255)
        model = ctx.backdoored_model()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        for v in ctx._backdoored.state.values():  # the weights a factory loads: this cell's copy
            v.zero_()
        return Outcome(ctx.make_model())


@dataclass
class Retrain(Defense):
    """Trains from scratch on what it is given: its result depends on every image and label."""

    def run(self, ctx: DefenseContext) -> Outcome:
        return Outcome(ctx.trainer.fit(ctx.make_model(), ctx.train, seed=ctx.seed))


def _reachable(root, limit=200_000):
    """Every object reachable from ``root`` through attributes, containers, closures, bound
    methods and partials (not through modules or classes: those lead to the whole interpreter)."""
    seen, stack, out = set(), [root], []
    while stack and len(out) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, str, bytes, int, float, bool)) or obj is None:
            continue
        seen.add(id(obj))
        out.append(obj)
        if isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        if isinstance(obj, functools.partial):
            stack += [obj.func, obj.args, obj.keywords]
        if isinstance(obj, (types.FunctionType, types.MethodType)):
            fn = getattr(obj, "__func__", obj)
            stack += [getattr(obj, "__self__", None), fn.__defaults__, fn.__kwdefaults__]
            stack += [c.cell_contents for c in (fn.__closure__ or ()) if _filled(c)]
        if hasattr(obj, "__dict__") and not isinstance(obj, types.FunctionType):
            stack += list(vars(obj).values())
        for slot in getattr(type(obj), "__slots__", ()):
            stack.append(getattr(obj, slot, None))
    return out


def _filled(cell):
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


@dataclass
class Digger(Defense):
    """Searches everything reachable from its context for the harness's ground truth."""


    def needs(self):
        return Needs(backdoored_model=True, clean_data=True)

    found = []

    def run(self, ctx: DefenseContext) -> Outcome:
        ctx.observe("start", ctx.backdoored_model())
        ctx.observe_flags("some", torch.arange(5))
        ctx.observe_scores("s", torch.arange(5), torch.ones(5))
        Digger.found = _reachable(ctx)
        return Outcome(ctx.backdoored_model())


@pytest.mark.slow
def test_a_defense_that_damages_its_inputs_changes_no_other_cell(tmp_path, threshold):
    m = parse_matrix(matrix_dict(defenses=["undefended", "test_isolation:Vandal", "test_isolation:Retrain"],
                                 recipe={**TINY_RECIPE, "epochs": 4}))
    cell = {c.defense.key: c for c in m.cells}
    shared = Runner(Store(tmp_path / "shared"))
    before = shared.poisoned(cell["undefended"])[0].train.x.clone()
    vandal = shared.run_cell(cell["test_isolation:Vandal"])
    threshold("vandal's ACC", vandal["acc"], "<", 0.3)  # it did damage its own model
    after = {k: shared.run_cell(cell[k]) for k in ("undefended", "test_isolation:Retrain")}
    assert torch.equal(shared.poisoned(cell["undefended"])[0].train.x, before)
    alone = Runner(Store(tmp_path / "alone"))
    for k in ("undefended", "test_isolation:Retrain"):
        ref = alone.run_cell(cell[k])
        assert (after[k]["acc"], after[k]["asr"]) == (ref["acc"], ref["asr"]), k
    threshold("retrained ACC", after["test_isolation:Retrain"]["acc"], ">", 0.5)  # trained on intact data


def test_nothing_reachable_from_the_context_leads_to_ground_truth(tmp_path):
    m = parse_matrix(matrix_dict(defenses=["test_isolation:Digger"], recipe={**TINY_RECIPE, "epochs": 2}))
    runner = Runner(Store(tmp_path))
    row = runner.run_cell(m.cells[0])
    found = Digger.found
    assert len(found) > 50  # the walk did go through the context (trainer, factories, record, logger)
    forbidden = (Runner, Store, PoisonedSet, TriggeredTest, Dataset)
    assert not [type(o).__name__ for o in found if isinstance(o, forbidden)]
    poisoned, trig = runner.poisoned(m.cells[0])
    n = len(poisoned.train)
    truth = {poisoned.is_poison.data_ptr(), poisoned.is_cover.data_ptr(), poisoned.y_orig.data_ptr(),
             trig.x.data_ptr()}
    tensors = [o for o in found if torch.is_tensor(o)]
    assert not [t for t in tensors if t.data_ptr() in truth]
    assert not [t for t in tensors if t.dtype == torch.bool and t.shape == (n,)]
    # the observations were still evaluated, after the defense returned
    tags = [o["tag"] for o in row["observations"]]
    assert tags == ["start", "some", "s"]
    assert row["observations"][0]["asr"] == row["asr"]  # the observed model is the returned one
