"""The backdoor-defense benchmark harness: data, models, trainer, metrics, matrix, runner, report."""

__version__ = "0.1.0"
