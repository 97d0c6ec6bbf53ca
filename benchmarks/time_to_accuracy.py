"""Time to accuracy on CIFAR-10 with BadNet at 5 %: the CPU setting of the old matrices against
``fastnet`` with the ``fast`` recipe, in fp32 and at ``--precision auto``.

Settings (each trains one backdoored model, BadNet 5 %, target 1, seed ``--seed``):

* ``a``: the earlier CPU setting: ``small_cnn``, a 20,000-image class-stratified slice, 10 epochs of
  the default one-cycle recipe, fp32;
* ``b``: ``fastnet`` + ``recipe: {preset: fast}`` on the full 50,000 images, fp32;
* ``c``: the same at ``precision: auto`` (bf16 on CPUs with native bf16 and on CUDA).

After every epoch the model's clean test accuracy is measured (outside the timed training), so the
script prints the accuracy-vs-minutes curve and the minutes to reach ``--target`` (default 90 %)
test accuracy.  Finally it measures the images/s of a bare training step (batch 128, pre-made
tensors) of ResNet-18 in bf16 and fp32 and projects the 100-epoch recipe of the papers from it.

Each line is printed as it is measured; ``--out FILE`` also writes everything as JSON.  Measure
on an otherwise idle machine: a second job on the same cores halves the numbers.

    python benchmarks/time_to_accuracy.py --data-root ../shared/data
    python benchmarks/time_to_accuracy.py --data-root ../shared/data --settings c --seed 1
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.core.data import ImageSet, load_dataset
from bench.core.metrics import accuracy, attack_success_rate
from bench.core.models import build_model
from bench.core.registry import ATTACKS
from bench.core.trainer import Recipe, Trainer, resolve_precision

#: (model, train_limit, recipe, precision) of each setting
SETTINGS = {
    "a": ("small_cnn", 20_000, dict(epochs=10), "fp32"),
    "b": ("fastnet", None, dict(preset="fast"), "fp32"),
    "c": ("fastnet", None, dict(preset="fast"), "auto"),
}
#: the papers' ResNet-18 recipe: epochs over the 50,000 CIFAR-10 training images
PAPER_EPOCHS, CIFAR_TRAIN = 100, 50_000


def recipe_of(spec: dict, precision: str, overrides: dict | None = None) -> Recipe:
    spec = dict(spec)
    preset = spec.pop("preset", None)
    if preset:
        spec.update(overrides or {})
    base = Recipe.preset(preset, **spec) if preset else Recipe(**spec)
    return base.with_(precision=precision, crop_padding=base.crop_padding or 4, flip=True)


def train_setting(name: str, args) -> dict:
    model_name, limit, spec, precision = SETTINGS[name]
    ds = load_dataset("cifar10", args.data_root, train_limit=limit)
    attack = ATTACKS.get("badnet")(poison_ratio=args.poison_ratio, target=args.target)
    poisoned, trig = attack.poison(ds.train, seed=args.seed), attack.test_set(ds.test)
    recipe = recipe_of(spec, precision, dict(_parse_set(item) for item in args.set))
    trainer = Trainer(device=torch.device(args.device), recipe=recipe)
    torch.manual_seed(args.seed)
    model = build_model(model_name, ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
    curve, clock = [], {"train": 0.0, "t0": time.perf_counter()}

    def on_epoch(epoch, m):  # the training's clock stops while the test set is evaluated
        clock["train"] += time.perf_counter() - clock["t0"]
        acc = trainer.accuracy(m, ds.test)
        curve.append({"epoch": epoch + 1, "minutes": clock["train"] / 60, "acc": acc})
        print(f"  [{name}] epoch {epoch + 1:>2}: {clock['train'] / 60:5.2f} min, test ACC {100 * acc:.2f}%", flush=True)
        clock["t0"] = time.perf_counter()

    trainer.fit(model, poisoned.train, seed=args.seed, on_epoch=on_epoch)
    clock["train"] += time.perf_counter() - clock["t0"]  # the end of training (lookahead's last average)
    pred, pred_t = trainer.predict(model, ds.test.x), trainer.predict(model, trig.x)
    acc, asr = accuracy(pred, ds.test.y), attack_success_rate(pred_t, trig.counts, trig.target)
    # for the record only, never in a benchmark number: what mirror test-time augmentation would read
    flip_logits = trainer.logits(model, ds.test.x) + trainer.logits(model, ds.test.x.flip(3))
    acc_tta = accuracy(flip_logits.argmax(1), ds.test.y)
    reached = next((c["minutes"] for c in curve if c["acc"] >= args.target_acc), None)
    images = trainer.train_samples
    out = {"setting": name, "model": model_name, "train_images": len(poisoned.train), "epochs": recipe.epochs,
           "precision": "bf16" if trainer.bf16 else "fp32", "why": trainer.precision_reason,
           "acc": acc, "asr": asr, "acc_flip_tta": acc_tta, "train_s": clock["train"], "images_per_s": images / clock["train"],
           "minutes_to_target": reached, "curve": curve}
    print(f"[{name}] {model_name}, {len(poisoned.train)} images, {recipe.epochs} epochs, {out['precision']} "
          f"({out['why']}): ACC {100 * acc:.2f}%, ASR {100 * asr:.2f}%, {clock['train']:.0f} s, "
          f"(ACC with mirror test-time augmentation, used nowhere else: {100 * acc_tta:.2f}%), "
          f"{out['images_per_s']:.0f} img/s", flush=True)
    return out


def _parse_set(item: str) -> tuple[str, object]:
    import yaml

    field, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set {item}: expected FIELD=VALUE")
    return field.strip(), yaml.safe_load(value)


def bare_step_rate(model_name: str, bf16: bool, steps: int, device: torch.device, batch: int = 128) -> float:
    torch.manual_seed(0)
    model = build_model(model_name, 3, 10, (0.5,) * 3, (0.25,) * 3, 32).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--settings", default="a,b,c", help="comma-separated subset of a, b, c (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poison-ratio", type=float, default=0.05)
    p.add_argument("--target", type=int, default=1)
    p.add_argument("--target-acc", type=float, default=0.90, help="the accuracy whose time is reported")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a recipe field of settings b and c (YAML value), e.g. --set epochs=12")
    p.add_argument("--resnet-steps", type=int, default=10, help="bare steps per ResNet-18 measurement (0: skip)")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args()
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}; precision auto here: "
          f"{' '.join(resolve_precision('auto', dev))}", flush=True)
    results = [train_setting(s.strip(), args) for s in args.settings.split(",") if s.strip()]
    base = next((r for r in results if r["setting"] == "a"), None)
    print("\nsetting | model | images | precision | ACC | ASR | train s | img/s | min to "
          f"{100 * args.target_acc:.0f}% | speed vs a")
    for r in results:
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        reach = f"{r['minutes_to_target']:.1f}" if r["minutes_to_target"] is not None else "not reached"
        print(f"{r['setting']} | {r['model']} | {r['train_images']} | {r['precision']} | {100 * r['acc']:.2f} | "
              f"{100 * r['asr']:.2f} | {r['train_s']:.0f} | {r['images_per_s']:.0f} | {reach} | {ratio}")
    by = {r["setting"]: r for r in results}
    if "b" in by and "c" in by:
        print(f"fastnet: {by['c']['precision']} / fp32 images/s = {by['c']['images_per_s'] / by['b']['images_per_s']:.2f}x")
    extra = {}
    if args.resnet_steps:
        for model_name in ("small_cnn", "resnet18"):
            rates = {dt: bare_step_rate(model_name, dt == "bf16", args.resnet_steps, dev) for dt in ("bf16", "fp32")}
            extra[model_name] = rates
            line = (f"{model_name} bare step (batch 128): bf16 {rates['bf16']:.0f} img/s, fp32 {rates['fp32']:.0f} "
                    f"img/s, bf16/fp32 {rates['bf16'] / rates['fp32']:.2f}x")
            if model_name == "resnet18":
                hours = {dt: PAPER_EPOCHS * CIFAR_TRAIN / r / 3600 for dt, r in rates.items()}
                line += (f"; the papers' {PAPER_EPOCHS}-epoch recipe would take {hours['bf16']:.1f} h (bf16) / "
                         f"{hours['fp32']:.1f} h (fp32) of bare steps")
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "bare_steps": extra, "threads": torch.get_num_threads(),
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
