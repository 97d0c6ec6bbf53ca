"""Training throughput: the harness Trainer vs a conventional DataLoader pipeline vs the bare step.

All three train the same model (default: small_cnn) with SGD on CIFAR-10 for the same number of
steps in one process and report images per second:

* harness:      ``Trainer.fit`` (uint8 data held as one tensor, batched crop+flip on the device);
* conventional: ``torch.utils.data.DataLoader`` over torchvision's ``CIFAR10`` dataset class with
                PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor), with 0 and
                with N loader workers; the better of the two is the reference;
* bare step:    forward+backward+SGD step on pre-made tensors, no data work at all (the ceiling).

Memory format matters on CPUs too, so every pipeline is measured in both contiguous and
channels_last format.  The headline ratio compares the harness as shipped (channels_last) with
the conventional pipeline as usually written (contiguous); the ratio against the conventional
pipeline in its best format is printed too.

    python benchmarks/trainer_throughput.py --data-root ../shared/data --steps 60
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.data import ImageSet, load_dataset
from bench.models import build_model
from bench.trainer import Recipe, Trainer


def make_model(ds, name, channels_last):
    torch.manual_seed(0)
    m = build_model(name, ds.channels, ds.num_classes, ds.mean, ds.std, ds.size)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def harness(ds, args, channels_last):
    n = args.steps * args.batch_size
    sub = ImageSet(ds.train.x[:n], ds.train.y[:n])
    recipe = Recipe(epochs=1, batch_size=args.batch_size, lr=0.05, schedule="constant")
    tr = Trainer(recipe=recipe, channels_last=channels_last)
    warm = ImageSet(ds.train.x[:args.warmup * args.batch_size], ds.train.y[:args.warmup * args.batch_size])
    model = make_model(ds, args.model, channels_last)
    tr.fit(model, warm)
    t0 = time.perf_counter()
    tr.fit(model, sub)
    return n / (time.perf_counter() - t0)


def bare(ds, args, channels_last):
    model = make_model(ds, args.model, channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x = ds.train.x[:args.batch_size].float() / 255
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = ds.train.y[:args.batch_size]

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def conventional(ds, args, workers, channels_last):
    from torchvision import transforms
    from torchvision.datasets import CIFAR10

    class ArrayCIFAR10(CIFAR10):
        """torchvision's CIFAR10 (PIL in __getitem__) over arrays already in memory."""

        def __init__(self, x_hwc, y, transform):
            self.data, self.targets = x_hwc, list(y)
            self.transform, self.target_transform = transform, None

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    n = (args.steps + args.warmup) * args.batch_size
    x_hwc = np.ascontiguousarray(ds.train.x[:n].permute(0, 2, 3, 1).numpy())
    loader = torch.utils.data.DataLoader(ArrayCIFAR10(x_hwc, ds.train.y[:n].tolist(), tf),
                                         batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)
    model = make_model(ds, args.model, channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    it = iter(loader)
    t0 = None
    for i in range(args.steps + args.warmup):
        if i == args.warmup:
            t0 = time.perf_counter()
        x, y = next(it)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None, help="folder with cifar10.npz (else $BENCH_DATA_ROOT, ./data)")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="loader workers of the second conventional run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("cifar10", args.data_root)
    print(f"small CPU benchmark: {args.model}, batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} torch threads")
    res = {}
    for cl in (False, True):
        tag = "channels_last" if cl else "contiguous"
        res[f"bare/{tag}"] = bare(ds, args, cl)
        res[f"harness/{tag}"] = harness(ds, args, cl)
    for cl in (False, True):
        tag = "channels_last" if cl else "contiguous"
        for w in (0, args.workers):
            res[f"conventional/{w} workers/{tag}"] = conventional(ds, args, w, cl)
    for k, v in res.items():
        print(f"{k:<40} {v:8.0f} img/s")
    h = res["harness/channels_last"]  # the Trainer's default
    typical = max(res[f"conventional/{w} workers/contiguous"] for w in (0, args.workers))
    best = max(v for k, v in res.items() if k.startswith("conventional"))
    print(f"harness (channels_last) vs conventional as usually written (contiguous, best workers): {h / typical:.2f}x")
    print(f"harness (channels_last) vs conventional in its best format and workers:            {h / best:.2f}x")
    print(f"harness vs bare model step, both channels_last:                                     "
          f"{h / res['bare/channels_last']:.2f}")
    print(f"harness contiguous vs bare contiguous:                                              "
          f"{res['harness/contiguous'] / res['bare/contiguous']:.2f}")


if __name__ == "__main__":
    main()
