"""netcl.distributed on 2 MPI ranks: each scenario of `tests/mpi_scenarios.py` runs under
`mpiexec -n 2` in a subprocess, bounded by a timeout (a hang fails the test), with one
PoCL thread per rank."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi_scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def mpiexec() -> str:
    """The mpiexec next to this Python (MPICH's wheel puts it there), else on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    assert found is not None, "no mpiexec: pip install 'netcl[mpi]' installs MPICH's"
    return found


def run_on_ranks(*argv: str, ranks: int = 2) -> str:
    env = {**os.environ, "POCL_MAX_PTHREAD_COUNT": "1", "POCL_CPU_MAX_CU_NUM": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [mpiexec(), "-n", str(ranks), sys.executable, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_scenario_on_two_ranks(scenario: str) -> None:
    output = run_on_ranks("-m", "tests.mpi_scenarios", scenario)
    assert sorted(re.findall(r"ok (\d)", output)) == ["0", "1"], output


def test_the_mean_on_three_ranks() -> None:
    """Three ranks on two cores: MPI may sum in a different order on each rank, so the
    mean is computed by blocks (reduce-scatter then all-gather)."""
    output = run_on_ranks("-m", "tests.mpi_scenarios", "mean_on_any_ranks", ranks=3)
    assert sorted(re.findall(r"ok (\d)", output)) == ["0", "1", "2"], output


def test_the_demo_trains_on_two_processes(capsys: pytest.CaptureFixture[str]) -> None:
    """`mpiexec -n 2 python -m netcl.demo`: rank 0 alone reports, with the accuracy of one
    process (each rank's gradients are means over half of each batch; their mean is the
    batch's mean up to rounding, which these 3 epochs do not show in the accuracy)."""
    from netcl import demo

    argv = ["--epochs", "3", "--quiet"]
    output = run_on_ranks("-m", "netcl.demo", *argv)
    assert output.count("held-out accuracy:") == 1 and "processes:         2" in output, output
    assert demo.main(argv) == 0
    alone = capsys.readouterr().out
    for line in ("training accuracy:", "held-out accuracy:"):
        ours = next(text for text in output.splitlines() if text.startswith(line))
        assert ours == next(text for text in alone.splitlines() if text.startswith(line))


def test_one_process_without_mpiexec() -> None:
    """Run as a plain script (a world of 1 rank), the wrappers step as the optimizer does."""
    import numpy as np

    from netcl import Parameter
    from netcl.distributed import DistributedOptimizer, ZeroRedundancyOptimizer, broadcast_parameters
    from netcl.optim import Adam

    params = [Parameter(np.ones(5, np.float32), np.full(5, 0.5, np.float32))]
    reference = [Parameter(np.ones(5, np.float32), np.full(5, 0.5, np.float32))]
    broadcast_parameters(params)
    DistributedOptimizer(ZeroRedundancyOptimizer(params, Adam, lr=0.1)).step()
    Adam(reference, lr=0.1).step()
    assert np.array_equal(params[0].data, reference[0].data)


def test_bad_arguments() -> None:
    import numpy as np

    from netcl import Parameter
    from netcl.distributed import DistributedOptimizer, ZeroRedundancyOptimizer
    from netcl.optim import Adam

    params = [Parameter(np.ones(5, np.float32))]
    with pytest.raises(TypeError, match="optimizer must be a netcl optimizer"):
        DistributedOptimizer(object())  # type: ignore[type-var]
    with pytest.raises(TypeError, match="comm must be an mpi4py"):
        DistributedOptimizer(Adam(params), comm=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1, got 0"):
        DistributedOptimizer(Adam(params), bucket_bytes=0)
    with pytest.raises(TypeError, match="optimizer_class must be a netcl optimizer class"):
        ZeroRedundancyOptimizer(params, dict)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="lr"):
        ZeroRedundancyOptimizer(params, Adam, lr=-1.0)
