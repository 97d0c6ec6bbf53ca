"""--executor slurm through submitit: poisoned sets packed into jobs, run by submitit's local backend
(subprocesses on this machine, as SLURM would run them on nodes)."""
import pytest

from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.schedule import execute, plan
from bench.store import Store, digest
from conftest import TINY_RECIPE, matrix_dict


def _cells(seeds, epochs=2):
    return parse_matrix(matrix_dict(seeds=list(seeds), recipe={**TINY_RECIPE, "epochs": epochs},
                                    defenses=["undefended", {"name": "finetuning", "epochs": 1}])).cells


def test_jobs_keep_each_poisoned_set_whole_and_its_model_first(tmp_path):
    from bench.slurm_executor import jobs_of

    p = plan(_cells(range(3)), Runner(Store(tmp_path)))
    for per_job, n_jobs in ((3, 3), (4, 2), (100, 1)):
        jobs = jobs_of(p, per_job)
        assert len(jobs) == n_jobs
        assert sorted(id(c) for j in jobs for k, c in j if k == "cell") == sorted(id(c) for c in p.todo)
        for job in jobs:
            seen = set()
            for kind, c in job:
                key = digest(c.backdoor_ident())
                if kind == "backdoor":
                    seen.add(key)
                else:
                    assert key in seen  # the model this cell needs was trained earlier in the same job


def test_a_matrix_runs_as_jobs_and_every_cell_reports(tmp_path):
    pytest.importorskip("submitit")
    from bench.slurm_executor import SlurmOptions

    runner = Runner(Store(tmp_path))
    cells = _cells(range(2))
    outcomes = execute(plan(cells, runner), runner, None, progress=None, executor="slurm",
                       slurm=SlurmOptions(cluster="local", cells_per_job=2, cpus=1))
    assert [o.status for o in outcomes] == ["done"] * 4
    assert all(o.result["acc"] > 0 for o in outcomes)
    assert len(list((tmp_path / "results").glob("*.json"))) == 4
    again = execute(plan(cells, runner), runner, None, progress=None, executor="slurm",
                    slurm=SlurmOptions(cluster="debug"))
    assert [o.status for o in again] == ["cached"] * 4
