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

With ``--device cuda`` every pipeline runs its step on the GPU under the harness's defaults there
(bf16 autocast); the conventional loader pins memory and copies each batch asynchronously, as a
GPU pipeline is usually written.  ``--no-bf16`` measures fp32 instead.  Timers synchronise the
device before reading the clock.

    python benchmarks/trainer_throughput.py --data-root ../shared/data --steps 60
    python benchmarks/trainer_throughput.py --device cuda --model resnet18 --workers 8 --steps 200
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.data import ImageSet, load_dataset
from bench.core.models import build_model
from bench.core.trainer import Recipe, Trainer


def make_model(ds, args, channels_last):
    torch.manual_seed(0)
    m = build_model(args.model, ds.channels, ds.num_classes, ds.mean, ds.std, ds.size).to(args.device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def repeat_to(s: ImageSet, n: int) -> ImageSet:
    """The first ``n`` images, cycling through the set when it is smaller than ``n``."""
    idx = torch.arange(n) % len(s)
    return ImageSet(s.x[idx], s.y[idx])


def sync(args):
    if args.device.type == "cuda":
        torch.cuda.synchronize(args.device)


def autocast(args):
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.bf16)


def harness(ds, args, channels_last):
    n = args.steps * args.batch_size
    sub = repeat_to(ds.train, n)
    recipe = Recipe(epochs=1, batch_size=args.batch_size, lr=0.05, schedule="constant")
    tr = Trainer(device=args.device, recipe=recipe, channels_last=channels_last, bf16=args.bf16)
    warm = ImageSet(ds.train.x[:args.warmup * args.batch_size], ds.train.y[:args.warmup * args.batch_size])
    model = make_model(ds, args, channels_last)
    tr.fit(model, warm)
    tr.on_device(sub.x), tr.on_device(sub.y)  # the one-off upload is not part of the steady state
    sync(args)
    t0 = time.perf_counter()
    tr.fit(model, sub)
    sync(args)
    return n / (time.perf_counter() - t0)


def bare(ds, args, channels_last):
    model = make_model(ds, args, channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x = ds.train.x[:args.batch_size].to(args.device).float() / 255
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = ds.train.y[:args.batch_size].to(args.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(args):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    sync(args)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args)
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
    sub = repeat_to(ds.train, (args.steps + args.warmup) * args.batch_size)
    x_hwc = np.ascontiguousarray(sub.x.permute(0, 2, 3, 1).numpy())
    cuda = args.device.type == "cuda"
    loader = torch.utils.data.DataLoader(ArrayCIFAR10(x_hwc, sub.y.tolist(), tf),
                                         batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False, pin_memory=cuda)
    model = make_model(ds, args, channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    it = iter(loader)
    t0 = None
    for i in range(args.steps + args.warmup):
        if i == args.warmup:
            sync(args)
            t0 = time.perf_counter()
        x, y = next(it)
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with autocast(args):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    sync(args)
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
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--no-bf16", action="store_true", help="on CUDA: fp32 instead of the bf16 default")
    args = p.parse_args()
    args.device = torch.device(args.device)
    args.bf16 = args.device.type == "cuda" and not args.no_bf16
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset("cifar10", args.data_root)
    where = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"benchmark on {where}: {args.model}, batch {args.batch_size}, {args.steps} steps, "
          f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} torch threads")
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
