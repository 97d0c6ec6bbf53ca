"""--executor slurm through submitit: poisoned sets packed into jobs, run by submitit's local backend
(subprocesses on this machine, as SLURM would run them on nodes)."""
import pytest
from conftest import TINY_RECIPE, matrix_dict

from bench.matrix import parse_matrix
from bench.runner import Runner
from bench.execution.loop import execute
from bench.execution.plan import plan
from bench.store import Store, digest


def _cells(seeds, epochs=2):
    return parse_matrix(matrix_dict(seeds=list(seeds), recipe={**TINY_RECIPE, "epochs": epochs},
                                    defenses=["undefended", {"name": "finetuning", "epochs": 1}])).cells


def test_backdoored_models_get_a_job_each_and_cells_are_packed_by_poisoned_set():
    from bench.execution.slurm_executor import pack

    cells = _cells(range(3))
    tasks = [(i, "cell", c) for i, c in enumerate(cells)] + [(10 + i, "backdoor", c) for i, c in enumerate(cells[::2])]
    for per_job, cell_jobs in ((2, 3), (4, 2), (100, 1)):
        jobs = pack(tasks, per_job)
        assert [len(j) for j in jobs[:3]] == [1, 1, 1] and all(j[0][1] == "backdoor" for j in jobs[:3])
        assert len(jobs) == 3 + cell_jobs and all(len(j) <= per_job for j in jobs[3:])
        assert sorted(t[0] for j in jobs for t in j) == sorted(t[0] for t in tasks)
    # one poisoned set's two cells share a job when they fit
    for job in pack(tasks, 2)[3:]:
        assert len({digest(t[2].backdoor_ident()) for t in job}) == 1


@pytest.mark.slow
def test_a_matrix_runs_as_jobs_and_every_cell_reports(tmp_path):
    pytest.importorskip("submitit")
    from bench.execution.slurm_executor import SlurmOptions

    runner = Runner(Store(tmp_path))
    cells = _cells(range(2))
    outcomes = execute(plan(cells, runner), runner, None, progress=None, executor="slurm",
                       slurm=SlurmOptions(cluster="local", cells_per_job=4, cpus=1))
    assert [o.status for o in outcomes] == ["done"] * 4
    assert all(o.result["acc"] > 0 for o in outcomes)
    assert len(list((tmp_path / "results").glob("*.json"))) == 4
    again = execute(plan(cells, runner), runner, None, progress=None, executor="slurm",
                    slurm=SlurmOptions(cluster="debug"))
    assert [o.status for o in again] == ["cached"] * 4
