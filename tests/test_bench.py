"""`python -m netcl.bench` keeps working (a seconds-long smoke run; no timing is asserted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyopencl as cl
import pytest

from netcl import bench


def test_smoke_run_writes_table_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert bench.main(["--smoke", "--quiet", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "floor/netcl" in text and "torch/netcl" in text and "of machine" in text
    data = json.loads(out_json.read_text())
    cases = {(row["case"], row["dtype"], row["variant"]) for row in data["rows"]}
    assert ("single", "float64", "centered") in cases and ("many", "float32", "plain") in cases
    assert ("flat", "float32", "centered") in cases and ("numpy-many", "float32", "momentum") in cases
    assert ("numpy-params", "float32", "plain") in cases and ("lstm", "float32", "plain") in cases
    assert ("bandwidth", "float32", "-") in cases and ("bandwidth", "float64", "-") in cases
    for row in data["rows"]:
        if row["case"] == "bandwidth":  # the streaming kernel, torch's add_
            assert set(row["median_ms"]) == {"floor", "torch"}
        elif row["case"] == "lstm":  # netcl's RMSProp, torch's RMSprop, torch's fused Adam
            assert set(row["median_ms"]) == {"netcl", "torch", "torch fused Adam"} and row["params"] == 7
        assert all(ms > 0 for ms in row["median_ms"].values()) and row["repeats"] >= 2
        assert set(row["spread"]) == set(row["median_ms"]) and all(v >= 0 for v in row["spread"].values())
    assert data["meta"]["device"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_chosen_variants_and_dtypes_are_run(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--quiet", "--variants", "adam", "--json", str(out_json)]) == 0
    cases = {(row["case"], row["dtype"], row["variant"]) for row in json.loads(out_json.read_text())["rows"]}
    assert cases == {
        ("single", "float32", "adam"),
        ("single", "float64", "adam"),
        ("many", "float32", "adam"),  # separate arrays
        ("flat", "float32", "adam"),  # flat_parameters
        ("numpy-many", "float32", "adam"),  # separate numpy arrays
        ("bandwidth", "float32", "-"),
        ("bandwidth", "float64", "-"),
    }


def test_table_gives_speed_ups_and_the_share_of_the_machine_as_text_or_markdown() -> None:
    # 20 MB moved per step by netcl in 2 ms: 10 GB/s; the machine moves 12 MB in 0.6 ms: 20 GB/s
    row = bench.Row("single", "float32", "plain", 10**6, 1, 20 * 10**6, {"netcl": 2.0, "floor": 1.0, "torch": 3.0})
    machine = bench.Row("bandwidth", "float32", "-", 10**6, 1, 12 * 10**6, {"floor": 0.8, "torch": 0.6})
    header, line, machine_line = (
        re.split(r"\s{2,}", text.strip()) for text in bench.table([row, machine]).splitlines()
    )
    cells = dict(zip(header, line, strict=True))
    assert cells["GB/s"] == "10" and cells["of machine"] == "0.50"
    assert cells["floor/netcl"] == "0.50" and cells["torch/netcl"] == "1.50" and cells["numpy ms"] == "-"
    assert dict(zip(header, machine_line, strict=True))["GB/s"] == "20"
    header_md, rule, line_md, _ = bench.table([row, machine], markdown=True).splitlines()
    assert header_md == f"| {' | '.join(header)} |" and line_md == f"| {' | '.join(line)} |"
    assert rule == "| --- | --- | --- | --- |" + " ---: |" * (len(header) - 5) + " --- |"
    # a step over more values than the machine's row was measured on: no share of it
    many = bench.Row("many", "float32", "plain", 2 * 10**6, 160, 40 * 10**6, {"netcl": 2.0})
    _, many_line, _ = (re.split(r"\s{2,}", text.strip()) for text in bench.table([many, machine]).splitlines())
    many_cells = dict(zip(header, many_line, strict=True))
    assert many_cells["GB/s"] == "20" and many_cells["of machine"] == "-"


def test_contenders_without_a_column_are_listed_with_their_speed_up() -> None:
    row = bench.Row("lstm", "float32", "plain", 117_000, 7, 10**6, {"netcl": 2.0, "torch fused Adam": 5.0})
    assert "torch fused Adam: 5 (2.50)" in bench.table([row])


@pytest.mark.parametrize(
    "argv", [["--sizes", "abc"], ["--sizes", "0"], ["--dtypes", "int8"], ["--variants", "nesterov"]]
)
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        bench.main([*argv, "--quiet"])
    assert caught.value.code == 2


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_kernel_costs_runs(optimizer: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tests import kernel_costs

    kernel_costs.main(["--optimizer", optimizer, "--size", "5000", "--rounds", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    names = [
        *kernel_costs.OPTIMIZERS[optimizer].bodies,
        "netcl step()",
        "netcl step(), nonfinite='count'",
        "netcl step(), nonfinite='propagate'",
    ]
    assert [row[0] for row in rows] == [f"| {name}" for name in names]
    assert all(float(row[1]) > 0 for row in rows)


def test_kernel_costs_of_many_parameters_runs(capsys: pytest.CaptureFixture[str], queue: cl.CommandQueue) -> None:
    from netcl import Parameter
    from netcl._kernels import max_slots
    from netcl._update import Step
    from netcl.optim import RMSProp
    from tests import kernel_costs

    kernel_costs.main(["--many", "40", "--rounds", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][2:]
    # (RMSProp's state, made by netcl, in one buffer: a launch takes it once)
    defaults = RMSProp([Parameter(np.zeros(1, np.float32))]).defaults
    spec = Step(RMSProp.rule, {n: RMSProp.hyperparameters[n](n, v) for n, v in defaults.items()}).kernel
    limit = max_slots(queue.device, spec, True)
    launches = -(-40 // limit)
    assert launches > 1
    assert [row[0] for row in rows] == [
        "| floor (one buffer, same bytes)",
        "| one parameter, 1 launch",
        f"| one parameter, {launches} launches",
        f"| 40 parameters, their {launches} launches",
        "| 40 parameters, step()",
    ]
    assert all(float(row[1]) > 0 for row in rows)


def test_a_wide_spread_is_reported(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "WIDE_SPREAD", -1.0)  # every row is "wide"
    assert bench.main(["--smoke", "--quiet", "--variants", "sgd", "--dtypes", "float32", "--many", "0"]) == 0
    err = capsys.readouterr().err
    assert "warning: single float32 sgd 1,000: the rounds' interquartile range is netcl" in err


def test_the_floor_launched_in_a_row_runs_each_launch(queue: cl.CommandQueue) -> None:
    import pyopencl.array as cl_array

    # the floor adds the gradient to the parameter and to each state buffer, once a launch
    grad = cl_array.to_device(queue, np.arange(1, 3001, dtype=np.float32))
    written = [cl_array.zeros(queue, 3000, np.float32) for _ in range(3)]
    bench.Floor(queue, np.dtype(np.float32), 2, settle_s=0.0, timed=1).launcher([grad, *written], 3000, 4)()
    for array in written:  # (small whole numbers: exact in float32)
        np.testing.assert_array_equal(array.get(), 4 * np.arange(1, 3001, dtype=np.float32))


def test_the_many_parameter_sizes_spread_on_a_log_or_a_linear_scale(capsys: pytest.CaptureFixture[str]) -> None:
    log, uniform = bench.many_sizes(160), bench.many_sizes(160, "uniform")
    assert all(64 <= n <= 20_000 for n in [*log, *uniform])
    assert (sum(log), sum(uniform)) == (537_397, 1_629_266)  # (the figures the docs quote)
    assert sorted(log)[80] < 2_000 < sorted(uniform)[80]  # (the median: mostly small on a log scale)
    argv = ["--smoke", "--quiet", "--markdown", "--variants", "sgd", "--dtypes", "float32", "--many", "4"]
    assert bench.main([*argv, "--many-spread", "uniform"]) == 0
    expected = f"{sum(bench.many_sizes(4, 'uniform')):,} in 4"
    assert f"| flat | float32 | sgd | {expected} |" in capsys.readouterr().out
