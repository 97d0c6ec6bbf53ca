"""FineTuning: retrain every layer of the backdoored model on the clean reserve.

The standard baseline of the backdoor-defense literature (the fine-tuning step of Liu,
Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018, without the pruning; BackdoorBench's ``ft`` defense), and a row of AdvrBD's
tables.  Cross-entropy on the reserve with the matrix recipe's optimizer and augmentation,
``epochs`` at ``lr`` with a cosine decay; no deviation of note.

Breaks the no-clean-data threat model: it needs ``ctx.clean_reserve`` (by default a 5%,
class-balanced set of genuinely clean training images that the harness holds out), and the
report's clean-data column says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.core.defense import Defense, DefenseContext, Needs, Outcome
from bench.core.registry import register_defense
from bench.core.trainer import Schedule


def require_reserve(ctx: DefenseContext, name: str):
    """The clean reserve, or a clear error when the harness gave none (or an empty one)."""
    if ctx.clean_reserve is None or len(ctx.clean_reserve) == 0:
        raise RuntimeError(f"{name} needs the clean reserve (ctx.clean_reserve); the harness gave none. "
                           "Set reserve_ratio > 0 in the matrix.")
    return ctx.clean_reserve


@register_defense("finetuning")
@dataclass
class FineTuning(Defense):
    """Fine-tune all layers of the backdoored model on the clean reserve with CE.

    Defaults: all layers trainable, SGD at lr 0.01 with cosine
    decay for 20 epochs, standard augmentation.  Momentum, weight decay and batch size are those of
    the matrix recipe's defense phases (``recipe.for_tuning()``: 0.9 / 5e-4 / 128 by default and in
    the fast preset), as in BackdoorBench and BackdoorBox.  No checkpoint
    selection: the last epoch is returned.
    """

    #: fine-tuning epochs on the reserve (default 20; BackdoorBench 100, BackdoorBox 10)
    epochs: int = 20
    #: learning rate (default 0.01; BackdoorBox 0.001 leaves more of the backdoor)
    lr: float = 0.01
    #: lr schedule (cosine: a smooth decay to 0 over the fine-tuning)
    schedule: Schedule = "cosine"
    #: random crop + flip of the matrix recipe during fine-tuning
    augment: bool = True


    def needs(self) -> Needs:
        return Needs(backdoored_model=True, clean_data=True)
    display_name = "FineTuning"

    def run(self, ctx: DefenseContext) -> Outcome:
        reserve = require_reserve(ctx, "FineTuning")
        model = ctx.backdoored_model()
        model = ctx.trainer.fit(model, reserve, epochs=self.epochs, lr=self.lr, schedule=self.schedule,
                                augment=self.augment, seed=ctx.seed, recipe=ctx.trainer.recipe.for_tuning())
        return Outcome(model, info={"reserve_size": len(reserve), "epochs": self.epochs})
