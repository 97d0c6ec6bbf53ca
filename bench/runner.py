"""Runs cells: poison -> backdoored model (cached, shared) -> defense -> evaluation -> result.

Artifacts in the store (see :mod:`bench.store`):

* ``poison/<key>/indices.json``: the poisoned and cover indices (a record; poisoning itself is
  deterministic and cheap, so it is recomputed in memory);
* ``backdoor/<key>/``: the undefended model trained on the poisoned set, shared by every
  defense that repairs a trained model and by the undefended baseline;
* ``results/<key>.json``: one row per finished cell (written last, atomically); a cell whose
  row exists is skipped;
* ``failures/<key>.json``: the traceback of a failed cell (the CLI skips it on the next run unless
  ``--retry-failed``);
* ``logs/<cell>.log``: a log file per cell;
* ``models/<result key>/``: the defended model (and any further models a defense returned), kept
  only when the run was asked to (``--save-models``); ``bench models`` lists them by cell label
  and ``bench export`` writes one out.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .core import metrics
from .core.attack import PoisonedSet, TriggeredTest
from .core.data import Dataset, ImageSet, load_dataset
from .core.defense import DefenseContext, Observations, Outcome
from .core.models import ModelFactory
from .core.tensors import round_robin, stream
from .core.trainer import Checkpoint, Stopwatch, Trainer
from .matrix import Cell
from .store import CellResult, Store, atomic_write_bytes, digest, sha256_file

log = logging.getLogger("bench")

#: a model is "at chance" when its accuracy on the training set (the labels a defender sees) is
#: below this multiple of the share of the most frequent label, i.e. of what predicting one class
#: scores: such a model learned nothing or collapsed, and its ACC/ASR say nothing about the defense
CHANCE_FACTOR = 1.5
#: training samples the chance guard predicts (a seeded random subset; all of them when fewer)
CHANCE_PROBE = 10_000


def clean_reserve(poisoned: PoisonedSet, ratio: float, seed: int) -> ImageSet:
    """A class-balanced set of genuinely clean training images, ``int(ratio * N)`` in all.

    Drawn from training samples that are neither poisoned nor cover (ground truth used only to
    guarantee cleanliness, as the threat model of FineTuning/FinePruning assumes).
    """
    n = int(ratio * len(poisoned.train))
    clean = (~(poisoned.is_poison | poisoned.is_cover)).nonzero().squeeze(1)
    gen = stream(seed, "clean_reserve")
    clean = clean[torch.randperm(len(clean), generator=gen)]
    order = round_robin(poisoned.y_orig[clean])  # class-balanced: first of each class, then second, ...
    idx = clean[order[:n]].sort().values
    return ImageSet(poisoned.train.x[idx], poisoned.y_orig[idx])


def evaluate(trainer: Trainer, model, test: ImageSet, trig: TriggeredTest, num_classes: int | None = None) -> dict:
    """ACC, ACC on non-target images, per-class recall, ASR and RA (see :mod:`bench.core.metrics`)."""
    pred = trainer.predict(model, test.x)
    pred_t = trainer.predict(model, trig.x)
    k = num_classes or int(test.y.max()) + 1
    recall = metrics.per_class_recall(pred, test.y, k)
    nontarget = test.y != trig.target
    return {"acc": metrics.accuracy(pred, test.y),
            "acc_nontarget": metrics.accuracy(pred[nontarget], test.y[nontarget]),
            "target_recall": recall[trig.target] if 0 <= trig.target < k else float("nan"),
            "recall": recall,
            "asr": metrics.attack_success_rate(pred_t, trig.counts, trig.target),
            "ra": metrics.robust_accuracy(pred_t, trig.y, trig.counts)}


def checked_flags(flagged, n: int, who: str) -> torch.Tensor:
    """``Outcome.flagged`` as a 1-D index tensor, or a clear error: indices of the training set, each
    at most once (a negative or repeated index would otherwise count silently in TPR/FPR)."""
    flagged = torch.as_tensor(flagged)
    if flagged.dim() != 1 or (len(flagged) and (flagged.is_floating_point() or flagged.dtype == torch.bool)):
        raise TypeError(f"{who}: Outcome.flagged must be a 1-D tensor of training-set indices, got "
                        f"{flagged.dtype} of shape {tuple(flagged.shape)}")
    flagged = flagged.long()
    if len(flagged) and (int(flagged.min()) < 0 or int(flagged.max()) >= n):
        raise ValueError(f"{who}: Outcome.flagged has indices outside 0..{n - 1}")
    if len(flagged.unique()) != len(flagged):
        raise ValueError(f"{who}: Outcome.flagged lists an index more than once")
    return flagged


def chance_probe(n: int, seed: int) -> torch.Tensor:
    """The sorted indices of the chance guard's probe: :data:`CHANCE_PROBE` of ``n`` training
    samples from the cell's own ``"chance-probe"`` stream.  A stream of its own matters: the
    attacks draw their poison from ``randperm(n)`` under the plain cell seed, and a probe drawn the
    same way held every poisoned sample (a WaNet probe at 10 % poison was 55 % target labels)."""
    return torch.randperm(n, generator=stream(seed, "chance-probe"))[:CHANCE_PROBE].sort().values


def chance_guard(trainer: Trainer, models: dict, train: ImageSet, seed: int) -> tuple[dict, list[str]]:
    """Training accuracy of each returned model on a probe of the training set, and a warning for
    each model at chance (see :data:`CHANCE_FACTOR`)."""
    probe = train.subset(chance_probe(len(train), seed))
    majority = float(torch.bincount(probe.y).max()) / len(probe)
    accs, warnings = {}, []
    for name, model in models.items():
        accs[name] = trainer.accuracy(model, probe)
        if accs[name] < CHANCE_FACTOR * majority:
            warnings.append(f"at chance: the {name} model's training accuracy is {100 * accs[name]:.1f}% "
                            f"(predicting the most frequent label scores {100 * majority:.1f}%)")
    return accs, warnings


def numerics(device, bf16: bool) -> dict:
    """How this process computes: results agree bit for bit only at equal values of all four (CPU
    kernels reduce in a different order with another thread count; GPUs and bf16 differ again)."""
    dev = torch.device(device)
    name = dev.type
    if dev.type == "cuda" and torch.cuda.is_available():
        name = f"cuda ({torch.cuda.get_device_name(dev)})"
    return {"device": name, "dtype": "bf16" if bf16 else "fp32", "threads": torch.get_num_threads(),
            "torch": torch.__version__}


@dataclass
class Runner:
    store: Store
    device: str = "cpu"
    data_root: str | None = None
    trainer_options: dict = field(default_factory=dict)
    #: keep each cell's defended model in the store (``models/<result key>/``)
    save_models: bool = False
    #: seconds between two in-training checkpoints of a backdoored model (``partial/``): a killed
    #: training resumes from the last one
    checkpoint_every_s: float = 120.0
    #: also checkpoint every this many epochs (None: by time only)
    checkpoint_every_epochs: int | None = None
    #: write each backdoored training's per-epoch records as TensorBoard scalars under
    #: ``<store>/tensorboard/`` (needs the ``tensorboard`` package)
    tensorboard: bool = False
    _datasets: dict = field(default_factory=dict)

    def options(self) -> dict:
        """What a worker process needs to build the same runner (besides the store and its device)."""
        root = str(Path(self.data_root).expanduser().resolve()) if self.data_root else None  # for other nodes
        return {"data_root": root, "trainer_options": self.trainer_options,
                "save_models": self.save_models, "checkpoint_every_s": self.checkpoint_every_s,
                "checkpoint_every_epochs": self.checkpoint_every_epochs, "tensorboard": self.tensorboard}
    _poisoned: dict = field(default_factory=dict)

    # --- inputs --------------------------------------------------------------------------------
    def dataset(self, cell: Cell) -> Dataset:
        key = (cell.dataset, self.data_root or cell.data_root)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(cell.dataset.name, key[1], cell.dataset.train_limit,
                                               cell.dataset.test_limit)
        return self._datasets[key]

    def poisoned(self, cell: Cell) -> tuple[PoisonedSet, TriggeredTest]:
        key = digest(cell.poison_ident())
        if key not in self._poisoned:
            ds = self.dataset(cell)
            ext = cell.external
            p = cell.attack.poison(ds.train, seed=cell.seed,
                                   indices=(ext.poison_idx, ext.cover_idx) if ext is not None else None)
            t = cell.attack.test_set(ds.test)
            rec = self.store.dir("poison", key) / "indices.json"
            if not rec.exists():
                self.store.save_json("poison", key, "indices.json", {
                    **cell.poison_ident(), "poison_idx": p.poison_idx.tolist(), "cover_idx": p.cover_idx.tolist()})
            self._poisoned = {key: (p, t)}  # keep one: cells are scheduled grouped by poison set
        return self._poisoned[key]

    def trainer(self, cell: Cell) -> Trainer:
        return Trainer(device=torch.device(self.device), recipe=cell.run_recipe, **self.trainer_options)

    def make_model(self, cell: Cell, ds: Dataset):
        return self.model_factory(cell, ds)()

    def model_factory(self, cell: Cell, ds: Dataset, **kw) -> ModelFactory:
        """Plain data that builds this cell's architecture (CPU, unless ``device`` is given)."""
        return ModelFactory(cell.model, ds.channels, ds.num_classes, tuple(ds.mean), tuple(ds.std), ds.size,
                            cell.seed, **kw)

    # --- the shared backdoored model ------------------------------------------------------------
    def backdoored(self, cell: Cell, wait: bool = True):
        """The undefended model on this cell's poisoned set: loaded from the store or trained once.
        With ``wait=False``, :class:`~bench.store.Held` when another process is training it."""
        key = cell.backdoor_key
        ds = self.dataset(cell)
        model = self.make_model(cell, ds)
        if self.store.load_model("backdoor", key, model) is not None:
            return model
        with self.store.lock("backdoor", key, wait=wait):
            if self.store.load_model("backdoor", key, model) is not None:  # another process made it
                return model
            poisoned, trig = self.poisoned(cell)
            trainer = self.trainer(cell)
            if cell.external is not None:
                self._import_backdoored(cell, key, model, trainer, ds, trig)
                return self.load_backdoored(cell)
            log.info("training backdoored model %s", cell.label)
            clock = Stopwatch()  # a resumed training sets it to the time its saved state had cost
            nums = numerics(self.device, trainer.bf16)
            ckpt = Checkpoint(self.store.root / "partial" / f"backdoor-{key}.pt", every_s=self.checkpoint_every_s,
                              tag=digest(nums), every_epochs=self.checkpoint_every_epochs, clock=clock)
            history: list = []
            writer = self._tensorboard(f"backdoor-{key}") if self.tensorboard else None
            try:
                model = trainer.fit(model, poisoned.train, extra_augment=cell.attack.train_augment(),
                                    seed=cell.seed, checkpoint=ckpt, name=f"backdoored model {cell.label}",
                                    history=history, on_record=writer)
            finally:
                if writer is not None:
                    writer.close()
            ev = evaluate(trainer, model, ds.test, trig, ds.num_classes)
            wall = clock.elapsed()
            atomic_write_bytes(self.store.dir("backdoor", key) / "metrics.jsonl",
                               "".join(json.dumps(h) + "\n" for h in history).encode())
            self.store.save_model("backdoor", key, model, {
                **cell.backdoor_ident(), **ev, "wall_time_s": wall, "numerics": nums, "history": history,
                "epoch_equivalents": trainer.train_samples / len(poisoned.train)})
        return self.load_backdoored(cell)

    def _tensorboard(self, name: str):
        """A per-epoch record writer (loss, training accuracy, lr, seconds as scalars), or None when
        the ``tensorboard`` package is missing (said once in the log)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
            return None
        sw = SummaryWriter(str(self.store.root / "tensorboard" / name))

        class Writer:
            def __call__(self, record):
                for k in ("loss", "train_acc", "lr", "seconds"):
                    if record.get(k) is not None:
                        sw.add_scalar(k, record[k], record["epoch"])

            def close(self):
                sw.close()

        return Writer()

    def _import_backdoored(self, cell: Cell, key: str, model, trainer: Trainer, ds: Dataset, trig) -> None:
        """Store a backdoored model trained elsewhere (``backdoored_models`` in the matrix) as this
        cell's, after checking its file against the checksum the matrix recorded."""
        ext = cell.external
        path = ext.weights
        if sha256_file(path) != ext.weights_sha256:
            raise ValueError(f"'{path}' changed since the matrix was read; run again")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"'{path}' is not a state dict of {cell.model} for {cell.dataset.name} "
                             f"({' '.join(str(e).split())[:300]})") from None
        model = model.to(self.device)
        ev = evaluate(trainer, model, ds.test, trig, ds.num_classes)
        log.info("imported backdoored model %s from %s: ACC %.1f ASR %.1f", cell.label, path, 100 * ev["acc"],
                 100 * ev["asr"])
        self.store.save_model("backdoor", key, model, {
            **cell.backdoor_ident(), **ev, "external": path, "wall_time_s": 0.0, "epoch_equivalents": 0.0,
            "numerics": numerics(self.device, trainer.bf16)})

    def load_backdoored(self, cell: Cell):
        ds = self.dataset(cell)
        model = self.make_model(cell, ds)
        if self.store.load_model("backdoor", cell.backdoor_key, model) is None:
            raise RuntimeError(f"backdoored model for {cell.label} vanished from the store")
        return model.to(self.device)

    # --- one cell --------------------------------------------------------------------------------
    def result_path(self, cell: Cell):
        return self.store.result_path(cell.key)

    def cached_result(self, cell: Cell) -> CellResult | None:
        """The cell's verified result; a corrupt, edited or malformed file is named once and ignored."""
        return self.store.read_result(cell.key)

    def has_saved_model(self, cell: Cell) -> bool:
        return (self.store.dir("models", cell.key) / "meta.json").exists()

    def finished(self, cell: Cell) -> CellResult | None:
        """The cell's cached result when nothing this run asks for is missing: with ``save_models``,
        a result without its saved model counts as unfinished (the cell is recomputed to save it)."""
        row = self.cached_result(cell)
        if row is not None and self.save_models and not self.has_saved_model(cell):
            return None
        return row

    def run_cell(self, cell: Cell, wait: bool = True) -> dict:
        """The cell's result, computed here unless the store has it."""
        return self.compute(cell, wait)[0]

    def compute(self, cell: Cell, wait: bool = True) -> tuple[dict, bool]:
        """``(the cell's result, whether this call computed it)``: from the store when it has it.
        With ``wait=False``, :class:`~bench.store.Held` when another process is computing it."""
        cached = self.finished(cell)
        if cached is not None:
            return cached.row, False
        with self.store.lock("result", cell.key, wait=wait):
            cached = self.finished(cell)  # another process may have finished it meanwhile
            if cached is not None:
                return cached.row, False
            return self._run_cell(cell).row, True

    def _run_cell(self, cell: Cell) -> CellResult:
        ds = self.dataset(cell)
        poisoned, trig = self.poisoned(cell)
        backdoor_meta = None
        if cell.defense.needs().backdoored_model:
            self.backdoored(cell)
            backdoor_meta = self.store.load_json(self.store.dir("backdoor", cell.backdoor_key) / "meta.json")
        trainer = self.trainer(cell)
        eval_trainer = Trainer(device=trainer.device, recipe=cell.run_recipe, **self.trainer_options)
        recorded = Observations()
        clock = Stopwatch()  # a phase resumed from a checkpoint sets it to the time that state had cost
        ctx = self._context(cell, ds, poisoned, trainer, recorded, clock)
        out = cell.defense.run(ctx)
        if not isinstance(out, Outcome):
            raise TypeError(f"{type(cell.defense).__name__}.run must return an Outcome, got {type(out).__name__}")
        if out.flagged is not None:
            out.flagged = checked_flags(out.flagged, len(poisoned.train), type(cell.defense).__name__)
        wall = clock.elapsed()
        n = len(poisoned.train)
        row = {**cell.row(), **evaluate(eval_trainer, out.model, ds.test, trig, ds.num_classes),
               "wall_time_s": wall, "numerics": numerics(self.device, trainer.bf16),
               "epoch_equivalents": (trainer.train_samples + trainer.eval_samples / 3) / n,
               "n_train": n, "n_poison": int(poisoned.is_poison.sum()), "n_cover": int(poisoned.is_cover.sum()),
               "info": out.info, "observations": self.evaluate_observations(cell, recorded, eval_trainer, poisoned, trig),
               "key": cell.key}
        if backdoor_meta is not None:
            row["backdoor"] = {k: backdoor_meta.get(k) for k in ("acc", "acc_nontarget", "target_recall", "asr", "ra",
                                                                 "wall_time_s", "epoch_equivalents", "numerics")}
        self._measure(cell, out, row, eval_trainer, ds, poisoned, trig)
        if self.save_models:  # before the result, so a result with save_models always has its model
            self._save_models(cell, out)
        for ev in cell.evaluations:  # extra evaluations of the defended model (matrix ``evaluate``)
            log.info("%s: %s", ev.key, cell.label)
            row[ev.key] = ev.evaluate(out.model, ds.test, ds.num_classes, eval_trainer, seed=cell.seed).summary()
        saved = self.store.save_result(self.result_path(cell), row)
        for phase in (self.store.root / "partial").glob(f"cell-{cell.key}-*.pt"):
            phase.unlink(missing_ok=True)  # the defense's phase checkpoints (ctx.checkpoint), now obsolete
        return saved

    def _context(self, cell: Cell, ds: Dataset, poisoned: PoisonedSet, trainer: Trainer,
                 recorded: Observations, clock: Stopwatch | None = None) -> DefenseContext:
        """What the defense sees.  Plain data (see bench.core.defense): the cell's own copy of the
        training set, model factories without a reference to this runner, and a record of
        observations the runner evaluates afterwards."""
        needs = cell.defense.needs()
        backdoored = None
        if needs.backdoored_model:
            state = {k: v.detach().cpu().clone() for k, v in self.load_backdoored(cell).state_dict().items()}
            backdoored = self.model_factory(cell, ds, device=str(trainer.device), state=state)
        return DefenseContext(
            train=ImageSet(poisoned.train.x.clone(), poisoned.train.y.clone()),  # no ground truth crosses this line
            num_classes=ds.num_classes,
            make_model=self.model_factory(cell, ds, device=str(trainer.device), channels_last=trainer.channels_last),
            trainer=trainer, seed=cell.seed,
            clean_reserve=(clean_reserve(poisoned, cell.reserve_ratio, cell.seed)
                           if needs.clean_data else None),
            log=logging.getLogger(f"bench.defense.{cell.defense.key}"),
            _backdoored=backdoored, _observations=recorded,
            _checkpoints=Checkpoint(self.store.root / "partial" / f"cell-{cell.key}.pt",
                                    every_s=self.checkpoint_every_s,
                                    tag=digest(numerics(self.device, trainer.bf16)), clock=clock))

    def _measure(self, cell: Cell, out: Outcome, row: dict, trainer: Trainer, ds: Dataset, poisoned: PoisonedSet,
                 trig: TriggeredTest) -> None:
        """Add to ``row`` what the harness measures besides ACC/ASR: the chance guard's training
        accuracies and warnings, detection against the ground truth, the further models' metrics."""
        train_acc, chance = chance_guard(trainer, {"defended": out.model, **out.extra_models}, poisoned.train,
                                         cell.seed)
        row["train_acc"] = train_acc
        # one list of everything a reader should know about this number: the defense's own guards and ours
        row["warnings"] = [str(w) for w in (out.info or {}).get("warnings", [])] + chance
        for w in chance:
            log.warning("%s: %s", cell.label, w)
        if out.flagged is not None:
            row["detection"] = metrics.detection(out.flagged, poisoned.is_poison)
        for name, m in out.extra_models.items():
            row.setdefault("extra", {})[name] = evaluate(trainer, m, ds.test, trig, ds.num_classes)

    def _save_models(self, cell: Cell, out: Outcome) -> None:
        key = cell.key
        self.store.save_model("models", key, out.model, {"cell": cell.label, "result": key})
        for name, m in out.extra_models.items():
            self.store.save_model("models", f"{key}-{name}", m, {"cell": cell.label, "result": key, "model": name})

    def evaluate_observations(self, cell: Cell, recorded: Observations, trainer: Trainer, poisoned: PoisonedSet,
                              trig: TriggeredTest) -> list[dict]:
        """Evaluate what the defense observed, in order, with the ground truth it never saw."""
        ds, out = self.dataset(cell), []
        for kind, tag, payload in recorded.items:
            if kind == "model":
                out.append({"tag": tag, **evaluate(trainer, trainer.prepare(payload), ds.test, trig, ds.num_classes)})
                log.info("%s %s: ACC %.1f ASR %.1f", cell.defense.key, tag, 100 * out[-1]["acc"], 100 * out[-1]["asr"])
            elif kind == "flags":
                out.append({"tag": tag, "kind": "flags", **metrics.detection(payload, poisoned.is_poison)})
                log.info("%s %s: flagged %d, TPR %.1f FPR %.1f", cell.defense.key, tag, out[-1]["flagged"],
                         100 * out[-1]["tpr"], 100 * out[-1]["fpr"])
            else:
                indices, scores = payload
                out.append({"tag": tag, "kind": "scores",
                            **metrics.score_separation(scores, poisoned.is_poison[indices])})
        return out

    def cell_log(self, cell: Cell) -> logging.Handler:
        """Attach a log file for this cell to the root logger (the caller removes it)."""
        path = self.store.root / "logs" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", cell.label) + ".log")
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(h)
        return h


