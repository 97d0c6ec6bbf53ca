"""Executing a matrix: plan → tasks → executors → one loop → outcomes.

* :mod:`~bench.execution.plan`: what to run (cached, failed before, to do; backdoored models to
  train), device slots, filters and shards, the checks before any work, the dry run;
* :mod:`~bench.execution.tasks`: one task and its :class:`~bench.execution.tasks.TaskResult`,
  and the one way a worker (process, Ray task, SLURM job) builds its runner;
* :mod:`~bench.execution.executors`: serial, worker processes, Ray, SLURM, by name;
* :mod:`~bench.execution.loop`: the task-graph loop shared by every executor;
* :mod:`~bench.execution.cost`, :mod:`~bench.execution.progress`: the ETA and the progress line;
* :mod:`~bench.execution.failures`, :mod:`~bench.execution.signals`: failures, their causes and
  their records; Ctrl-C.

The layers: execution imports the runner, the runner imports the core, never the other way.
"""
