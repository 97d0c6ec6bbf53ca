"""Trigger gallery: clean vs triggered examples, the trigger itself, and training-time samples,
one row per attack, as one PNG: a matrix's attacks with its parameters (the report), or every
registered attack with default parameters (``python -m bench gallery``).

Columns: the trigger on a mid-grey canvas (WaNet: its displacement field, 0.5 + 2 * dx/dy pixels
in red/green), ``examples`` clean/triggered test pairs, the amplified difference of the first
pair, one training-time poisoned sample (after the attack's own training augmentation, if it
has one: PhysicalBA) and, where the attack has them, one cover sample.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from .core.attack import Attack
from .core.data import load_dataset
from .core.params import label
from .core.registry import ATTACKS
from .core.tensors import to_float, to_uint8

#: gain of the difference column
DIFF_GAIN = 4.0
#: grey level (0..255) of the canvas behind opaque patch triggers
DARK = 48
#: test images loaded (the gallery needs only a few)
TEST_LIMIT = 500
#: train images poisoned to find a training-time poison/cover example
TRAIN_LIMIT = 2000
#: characters per line of a row's attack label (a longer label wraps, at its commas first)
LABEL_WIDTH = 18


def trigger_preview(attack: Attack, channels: int, size: int) -> torch.Tensor:
    """The trigger as a float C x H x W image in [0,1]."""
    grey = torch.full((1, channels, size, size), 128, dtype=torch.uint8)
    dark = torch.full((channels, size, size), DARK / 255)  # canvas for opaque patches
    if hasattr(attack, "warp"):  # WaNet: show the displacement field
        warp = attack.warp(size, size)[0]
        lin = torch.linspace(-1, 1, size)
        ident = torch.stack(torch.meshgrid(lin, lin, indexing="ij")[::-1], -1)
        d = (warp - ident) * (size - 1) / 2
        img = torch.stack([0.5 + 2 * d[..., 0], 0.5 + 2 * d[..., 1], torch.full_like(d[..., 0], 0.5)])
        return img.clamp(0, 1) if channels == 3 else img[:2].mean(0, keepdim=True).clamp(0, 1)
    if hasattr(attack, "test_triggers"):  # AdaptivePatch: every test trigger at full opacity
        x = dark
        for p, m in attack.test_triggers(channels, size):
            x = x + m * (p - x)
        return x
    if hasattr(attack, "trigger"):  # a (pattern, mask) pair: show it fully opaque
        p, m = attack.trigger(channels, size)
        return dark + m * (p - dark)
    return to_float(attack.apply_trigger(grey))[0]


def _pick(attack: Attack, y: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` counted test samples, preferring different classes."""
    idx = attack.asr_mask(y).nonzero().squeeze(1)
    chosen, seen = [], set()
    for i in idx.tolist():
        if int(y[i]) not in seen:
            chosen.append(i)
            seen.add(int(y[i]))
        if len(chosen) == n:
            break
    for i in idx.tolist():
        if len(chosen) == n:
            break
        if i not in chosen:
            chosen.append(i)
    return torch.tensor(chosen, dtype=torch.long)


def render_gallery(dataset: str = "digits", data_root: str | None = None, out: str | Path = "gallery.png",
                   examples: int = 3, seed: int = 0, attacks: list[Attack] | None = None,
                   names: list[str] | None = None) -> Path:
    """One row per attack: ``attacks`` as configured (a matrix's; ``names``: their labels there, else
    each one's name and non-default parameters), else every registered attack with its default
    parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = load_dataset(dataset, data_root, train_limit=TRAIN_LIMIT, test_limit=TEST_LIMIT)
    configured = attacks is not None
    attacks = list(attacks) if configured else [cls() for _, cls in ATTACKS.items()]
    names = list(names) if names is not None else [label(a) if configured else (a.display_name or a.key)
                                                    for a in attacks]
    c, size = ds.channels, ds.size
    cols = ["trigger"] + [t for i in range(examples) for t in (f"clean {i + 1}", f"triggered {i + 1}")] + \
        [f"|diff| x{DIFF_GAIN:g}", "train poison", "train cover"]
    fig, axes = plt.subplots(len(attacks), len(cols), figsize=(1.3 * len(cols), 1.45 * len(attacks)), squeeze=False)
    for r, attack in enumerate(attacks):
        tiles = [trigger_preview(attack, c, size)]
        idx = _pick(attack, ds.test.y, examples)
        clean = ds.test.x[idx]
        trig = attack.apply_trigger(clean)
        for i in range(len(idx)):
            tiles += [to_float(clean[i]), to_float(trig[i])]
        tiles += [None] * (2 * examples - 2 * len(idx))
        diff = (to_float(trig[0]) - to_float(clean[0])).abs() * DIFF_GAIN if len(idx) else None
        tiles.append(None if diff is None else diff.clamp(0, 1))
        ps = attack.poison(ds.train, seed=seed)
        pi, ci = ps.poison_idx, ps.cover_idx
        sample = to_float(ps.train.x[pi[:1]])
        aug = attack.train_augment()
        if aug is not None and len(pi):  # what the model sees: with the attack's own augmentation
            sample = aug(sample, torch.Generator().manual_seed(seed))
        tiles.append(sample[0] if len(pi) else None)
        tiles.append(to_float(ps.train.x[ci[0]]) if len(ci) else None)
        for k, (ax, tile) in enumerate(zip(axes[r], tiles)):
            ax.set_xticks([]), ax.set_yticks([])
            if tile is None:
                ax.axis("off")
            else:
                img = to_uint8(tile).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=255,
                          interpolation="nearest")
            if r == 0:
                ax.set_title(cols[k], fontsize=7)
        name = names[r]
        # a long configured label (parameters) wraps at its commas instead of running off the figure
        axes[r][0].set_ylabel(textwrap.fill(name.replace(", ", ",\n") if len(name) > LABEL_WIDTH else name,
                                            LABEL_WIDTH, replace_whitespace=False), fontsize=7)
    fig.suptitle(f"{dataset} ({size}x{size}, {c} channel{'s' if c > 1 else ''}): "
                 f"{'the parameters of the matrix' if configured else 'default parameters'}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
