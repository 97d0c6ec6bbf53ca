"""The ground layer of the harness: what attacks, defenses and evaluations build on.

* :mod:`bench.core.data`: images as uint8 tensors, datasets and their loaders;
* :mod:`bench.core.models`: the architectures and the model interface defenses rely on;
* :mod:`bench.core.trainer`: the one training and evaluation loop, which counts every pass;
* :mod:`bench.core.params`: parameter validation (types, choices, ranges) and display labels;
* :mod:`bench.core.registry`: one registry per kind of component;
* :mod:`bench.core.metrics`: ACC, ASR, RA, detection and score separation;
* :mod:`bench.core.tensors`: shared tensor helpers and named random streams;
* :mod:`bench.core.attack`, :mod:`bench.core.defense`, :mod:`bench.core.evaluation`: the base
  classes of the components.

Nothing here imports the components or the roof (runner, execution, CLI, report).
"""
