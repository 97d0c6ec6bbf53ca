"""Ray executor: every backdoored model and every cell is a Ray task.

A task asks for one GPU when the slots are CUDA devices (``--devices cuda``) and for as many CPUs
as a slot has threads otherwise.  On a cluster, start Ray (``ray start --head`` / ``--address``),
set ``RAY_ADDRESS``, and point ``--output`` at a filesystem every node sees: the artifact store is
the only channel between tasks, and its atomic writes and file locks make concurrent tasks safe.
Without ``RAY_ADDRESS`` a local Ray instance is started.
"""
from __future__ import annotations

import os
import sys
import traceback


def _task(kind, cell, store_root, data_root, trainer_options, device, threads, save_models=False):
    import torch

    from .runner import Runner
    from .schedule import _run_task
    from .store import Store

    torch.set_num_threads(threads)
    runner = Runner(Store(store_root), device=device, data_root=data_root, trainer_options=trainer_options,
                    save_models=save_models)
    return _run_task(runner, kind, cell, True)  # Ray schedules each task once: wait for a held lock


def run_ray(p, runner, slots, waiting, ready, finish, prog) -> None:
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("--executor ray needs Ray: pip install -e '.[ray]'") from e
    gpu = any(s.device.startswith("cuda") for s in slots)
    threads = slots[0].threads
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            # workers import what this process can (a user's own defense module included)
            path = os.pathsep.join(p for p in sys.path if p)
            ray.init(num_cpus=sum(s.threads for s in slots), num_gpus=len(slots) if gpu else 0,
                     include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
    remote = ray.remote(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else threads, max_retries=0)(_task)
    args = (str(runner.store.root.resolve()), runner.data_root, runner.trainer_options,
            "cuda" if gpu else "cpu", threads, runner.save_models)

    pending = {}
    for key, c in p.backdoors.items():
        pending[remote.remote("backdoor", c, *args)] = ("backdoor", key, c)
    for c in ready:
        pending[remote.remote("cell", c, *args)] = ("cell", None, c)
    while pending:
        prog.running = min(len(pending), len(slots))
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            kind, key, c = pending.pop(ref)
            try:
                status, payload, tb, dt = ray.get(ref)
            except Exception as e:  # the task or its worker died
                status, payload, tb, dt = "failed", f"ray task died: {e!r}", traceback.format_exc(), 0.0
            if kind == "cell":
                finish(c, status, payload, tb, dt)
            elif status == "done":
                for cell in waiting.pop(key):
                    pending[remote.remote("cell", cell, *args)] = ("cell", None, cell)
            else:
                for cell in waiting.pop(key):
                    finish(cell, "failed", f"backdoored model failed: {payload}", tb, 0.0)
    prog.running = 0
