"""The demo: its hand-written gradients, a short training run, its plot and command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

from netcl import demo


def test_gradients_match_torch_autograd(queue: cl.CommandQueue) -> None:
    model = demo.MLP(queue, [64, 64, 10], seed=3)
    x_train, y_train, _, _ = demo.load_digits_split(seed=3)
    x, y = x_train[:16], y_train[:16]
    losses = model.loss_and_gradients(cl_array.to_device(queue, x), cl_array.to_device(queue, y))

    weights = [torch.tensor(p.data.get(), requires_grad=True) for p in model.weights]
    biases = [torch.tensor(p.data.get(), requires_grad=True) for p in model.biases]
    h = torch.tensor(x)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = h @ w + b
        if i < len(weights) - 1:
            h = torch.relu(h)
    per_example = torch.nn.functional.cross_entropy(h, torch.tensor(y, dtype=torch.long), reduction="none")
    expected = torch.autograd.grad(per_example.mean(), [t for pair in zip(weights, biases, strict=True) for t in pair])

    # float32 sums over at most 64 terms of order 1: agreement to ~1e-6 relative
    np.testing.assert_allclose(losses.get(), per_example.detach().numpy(), rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(model.parameters(), expected, strict=True):
        assert mine.grad is not None
        np.testing.assert_allclose(mine.grad.get(), theirs.numpy(), rtol=1e-4, atol=1e-6)


def test_a_short_run_learns_and_is_reproducible(queue: cl.CommandQueue) -> None:
    _, first = demo.train(queue, epochs=3, lr=1e-3, batch_size=64, seed=0, progress=False)
    _, second = demo.train(queue, epochs=3, lr=1e-3, batch_size=64, seed=0, progress=False)
    assert first.test_accuracy[-1] >= 0.8  # chance is 0.1
    assert first.train_loss[-1] < first.train_loss[0]
    assert first == second


def test_command_line_prints_a_summary_and_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import matplotlib.image

    path = tmp_path / "history.png"
    assert demo.main(["--epochs", "2", "--quiet", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    for line in ("device:", "epochs:", "time:", "held-out accuracy:", f"plot:              {path}"):
        assert line in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--lr", "-1"], ["--device", "x:y"]])
def test_command_line_rejects_bad_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        demo.main([*argv, "--quiet"])
    assert caught.value.code == 2
