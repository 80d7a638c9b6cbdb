"""Train a small neural network on OpenCL arrays you own, with netcl's RMSProp.

    python -m netcl.demo [--epochs 30] [--lr 1e-3] [--seed 0] [--device P:D] [--plot loss.png]
    mpiexec -n 2 python -m netcl.demo   # data-parallel, on 2 processes (needs netcl[mpi])

A 64-64-10 multilayer perceptron learns to classify the 8x8 handwritten digits that
scikit-learn ships (1,797 images; nothing is downloaded). The weights, biases and their
gradients are pyopencl arrays that this file owns; the forward and backward passes are the
four short OpenCL kernels below. netcl only does what it is for: one fused RMSProp update
of each parameter per step, on the arrays' own queue.

Under `mpiexec`, each process computes the gradients of its share of every batch and
`netcl.distributed.DistributedOptimizer` averages them before the step: the processes
train one model together, and rank 0 prints and plots.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array

from netcl import Parameter
from netcl.device import create_queue, describe_device
from netcl.optim import RMSProp

if TYPE_CHECKING:
    from mpi4py import MPI

    from netcl.distributed import DistributedOptimizer

__all__ = ["MLP", "History", "load_digits_split", "main", "train"]

KERNELS = r"""
// y = x @ W + b, then ReLU if relu != 0.   x: (batch, n_in), W: (n_in, n_out)
__kernel void dense(__global const float *x, __global const float *W,
                    __global const float *b, __global float *y,
                    int n_in, int n_out, int relu)
{
    int r = get_global_id(0), c = get_global_id(1);
    float s = b[c];
    for (int k = 0; k < n_in; ++k) s += x[r * n_in + k] * W[k * n_out + c];
    y[r * n_out + c] = (relu && s < 0.0f) ? 0.0f : s;
}

// Softmax cross-entropy: loss[r] = -log p[r, label], dz = (p - onehot(label)) / batch
__kernel void softmax_xent(__global const float *z, __global const int *labels,
                           __global float *dz, __global float *loss, int n_out, int batch)
{
    int r = get_global_id(0);
    __global const float *zr = z + r * n_out;
    float top = zr[0];
    for (int c = 1; c < n_out; ++c) top = fmax(top, zr[c]);
    float total = 0.0f;
    for (int c = 0; c < n_out; ++c) total += exp(zr[c] - top);
    for (int c = 0; c < n_out; ++c) {
        float p = exp(zr[c] - top) / total;
        dz[r * n_out + c] = (p - (c == labels[r] ? 1.0f : 0.0f)) / batch;
    }
    loss[r] = log(total) - (zr[labels[r]] - top);
}

// dW = x^T @ dy and db = column sums of dy; work-item (n_in, c) computes db[c]
__kernel void dense_grad(__global const float *x, __global const float *dy,
                         __global float *dW, __global float *db,
                         int batch, int n_in, int n_out)
{
    int k = get_global_id(0), c = get_global_id(1);
    float s = 0.0f;
    for (int r = 0; r < batch; ++r)
        s += (k < n_in ? x[r * n_in + k] : 1.0f) * dy[r * n_out + c];
    if (k < n_in) dW[k * n_out + c] = s; else db[c] = s;
}

// dx = (dy @ W^T) * (x > 0): back through the layer and the ReLU that made x
__kernel void input_grad(__global const float *dy, __global const float *W,
                         __global const float *x, __global float *dx, int n_in, int n_out)
{
    int r = get_global_id(0), k = get_global_id(1);
    float s = 0.0f;
    for (int c = 0; c < n_out; ++c) s += dy[r * n_out + c] * W[k * n_out + c];
    dx[r * n_in + k] = x[r * n_in + k] > 0.0f ? s : 0.0f;
}
"""

F32 = np.float32


def buf(array: cl_array.Array) -> cl.Buffer:
    """The OpenCL buffer behind a pyopencl array, as a raw kernel takes it."""
    data = array.data
    assert isinstance(data, cl.Buffer)
    return data


def load_digits_split(
    seed: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """The digits, scaled to [0, 1], split 80/20 into training and held-out sets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(F32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


class MLP:
    """A 64-64-10 ReLU network whose parameters and gradients are pyopencl arrays."""

    def __init__(self, queue: cl.CommandQueue, sizes: Sequence[int], seed: int) -> None:
        self.queue: cl.CommandQueue = queue
        self.sizes: list[int] = list(sizes)
        program = cl.Program(queue.context, KERNELS).build()
        self.dense: cl.Kernel = cl.Kernel(program, "dense")
        self.softmax_xent: cl.Kernel = cl.Kernel(program, "softmax_xent")
        self.dense_grad: cl.Kernel = cl.Kernel(program, "dense_grad")
        self.input_grad: cl.Kernel = cl.Kernel(program, "input_grad")
        rng = np.random.default_rng(seed)
        self.weights: list[Parameter[cl_array.Array]] = []
        self.biases: list[Parameter[cl_array.Array]] = []
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            w = rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_out)).astype(F32)  # He init
            self.weights.append(Parameter(cl_array.to_device(queue, w), cl_array.zeros(queue, w.shape, F32)))
            self.biases.append(Parameter(cl_array.zeros(queue, n_out, F32), cl_array.zeros(queue, n_out, F32)))

    def parameters(self) -> list[Parameter[cl_array.Array]]:
        """The weights and biases, layer by layer."""
        return [p for pair in zip(self.weights, self.biases, strict=True) for p in pair]

    def forward(self, x: cl_array.Array) -> list[cl_array.Array]:
        """The activations of every layer, from the input to the logits."""
        acts = [x]
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            n_in, n_out = w.data.shape
            y = cl_array.empty(self.queue, (x.shape[0], n_out), F32)
            relu = int(i < len(self.weights) - 1)
            self.dense(
                self.queue,
                (x.shape[0], n_out),
                None,
                buf(acts[-1]),
                buf(w.data),
                buf(b.data),
                buf(y),
                np.int32(n_in),
                np.int32(n_out),
                np.int32(relu),
            )
            acts.append(y)
        return acts

    def losses(self, logits: cl_array.Array, labels: cl_array.Array) -> tuple[cl_array.Array, cl_array.Array]:
        """The per-example cross-entropy and its gradient with respect to the logits."""
        batch, n_out = logits.shape
        dy = cl_array.empty_like(logits)
        losses = cl_array.empty(self.queue, batch, F32)
        self.softmax_xent(
            self.queue, (batch,), None, buf(logits), buf(labels), buf(dy), buf(losses), np.int32(n_out), np.int32(batch)
        )
        return losses, dy

    def loss_and_gradients(self, x: cl_array.Array, labels: cl_array.Array) -> cl_array.Array:
        """Forward and backward over one batch: fills every parameter's `grad`; returns
        the per-example losses."""
        acts = self.forward(x)
        losses, dy = self.losses(acts[-1], labels)
        batch = x.shape[0]
        for i in reversed(range(len(self.weights))):
            w, b = self.weights[i], self.biases[i]
            n_in, n_out = w.data.shape
            assert w.grad is not None and b.grad is not None
            self.dense_grad(
                self.queue,
                (n_in + 1, n_out),
                None,
                buf(acts[i]),
                buf(dy),
                buf(w.grad),
                buf(b.grad),
                np.int32(batch),
                np.int32(n_in),
                np.int32(n_out),
            )
            if i > 0:
                dx = cl_array.empty_like(acts[i])
                self.input_grad(
                    self.queue,
                    (batch, n_in),
                    None,
                    buf(dy),
                    buf(w.data),
                    buf(acts[i]),
                    buf(dx),
                    np.int32(n_in),
                    np.int32(n_out),
                )
                dy = dx
        return losses

    def evaluate(self, x: npt.NDArray[np.float32], y: npt.NDArray[np.int32]) -> tuple[float, float]:
        """Mean cross-entropy and accuracy on a data set (the gradients are left alone)."""
        logits = self.forward(cl_array.to_device(self.queue, x))[-1]
        losses, _ = self.losses(logits, cl_array.to_device(self.queue, y))
        predicted = np.argmax(logits.get(), axis=1)
        return float(losses.get().mean()), float(np.mean(predicted == y))


@dataclass
class History:
    """Per-epoch training and held-out loss and accuracy."""

    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)


def train(
    queue: cl.CommandQueue,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
    comm: MPI.Comm | None = None,
) -> tuple[MLP, History]:
    """Train the network on the digits and record its history, epoch by epoch.

    With `comm` (every rank calls this), each rank takes every `size`-th example of each
    batch (`batch_size` must divide among the ranks) and the gradients are averaged over
    the ranks before each step.
    """
    from tqdm import tqdm

    x_train, y_train, x_test, y_test = load_digits_split(seed)
    model = MLP(queue, [64, 64, 10], seed)
    rmsprop = RMSProp(model.parameters(), lr=lr)
    optimizer: RMSProp | DistributedOptimizer[RMSProp] = rmsprop
    rank, size = 0, 1
    if comm is not None:
        from netcl.distributed import DistributedOptimizer, broadcast_parameters

        rank, size = comm.Get_rank(), comm.Get_size()
        if batch_size % size:
            raise ValueError(f"batch_size {batch_size} does not divide among {size} processes")
        broadcast_parameters(model.parameters(), root=0, comm=comm)
        optimizer = DistributedOptimizer(rmsprop, comm)
    history = History()
    rng = np.random.default_rng(seed + 1)
    batches = range(0, len(y_train) - batch_size + 1, batch_size)
    bar = tqdm(total=epochs * len(batches), disable=not progress or rank != 0, unit="step", file=sys.stderr)
    for epoch in range(epochs):
        order = rng.permutation(len(y_train))
        for start in batches:
            rows = order[start : start + batch_size][rank::size]
            x = cl_array.to_device(queue, x_train[rows])
            y = cl_array.to_device(queue, y_train[rows])
            losses = model.loss_and_gradients(x, y)
            optimizer.step()
            bar.update()
            if start == batches[-1]:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(losses.get().mean()):.4f}")
        for (loss, accuracy), into in (
            (model.evaluate(x_train, y_train), (history.train_loss, history.train_accuracy)),
            (model.evaluate(x_test, y_test), (history.test_loss, history.test_accuracy)),
        ):
            into[0].append(loss)
            into[1].append(accuracy)
    bar.close()
    return model, history


def plot(history: History, path: str) -> None:
    """Write a PNG of loss and accuracy per epoch, training and held-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history.train_loss) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(epochs, history.train_loss, label="training")
    left.plot(epochs, history.test_loss, label="held-out")
    left.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="Loss")
    right.plot(epochs, history.train_accuracy, label="training")
    right.plot(epochs, history.test_accuracy, label="held-out")
    right.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0.0, 1.0))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("netcl demo: 64-64-10 MLP on the digits, RMSProp on pyopencl arrays")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: train, print a summary, write the plot."""
    parser = argparse.ArgumentParser(prog="python -m netcl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=_positive(int), default=30, help="passes over the training set (30)")
    parser.add_argument("--lr", type=_positive(float), default=1e-3, help="RMSProp learning rate (1e-3)")
    parser.add_argument("--batch-size", type=_positive(int), default=64, help="examples per step (64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and order (0)")
    parser.add_argument("--device", help="OpenCL device as P or P:D (default: PYOPENCL_CTX or the first)")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of loss and accuracy per epoch")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    comm = _launched_by_mpiexec()
    size = 1 if comm is None else comm.Get_size()
    if args.batch_size % size:
        parser.error(f"--batch-size {args.batch_size} does not divide among {size} processes")
    try:
        queue = create_queue(args.device)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    try:
        _, history = train(
            queue,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.quiet,
            comm=comm,
        )
    except BaseException:
        if comm is None:
            raise
        # one rank failing alone would leave the others waiting in their next
        # collective: end the whole job instead
        traceback.print_exc()
        comm.Abort(1)
        raise
    seconds = time.perf_counter() - start
    if comm is not None and comm.Get_rank() != 0:
        return 0
    print(f"device:            {describe_device(queue)}")
    if comm is not None:
        print(f"processes:         {size} (data-parallel: {args.batch_size // size} examples of each batch each)")
    print(f"epochs:            {args.epochs} (batch {args.batch_size}, lr {args.lr}, seed {args.seed})")
    print(f"time:              {seconds:.1f} s")
    print(f"training accuracy: {history.train_accuracy[-1]:.2%}")
    print(f"held-out accuracy: {history.test_accuracy[-1]:.2%}")
    if args.plot:
        plot(history, args.plot)
        print(f"plot:              {args.plot}")
    return 0


# What MPICH's and Open MPI's mpiexec set in each process they start.
_MPIEXEC_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def _launched_by_mpiexec() -> MPI.Comm | None:
    """MPI's world when this process was started by mpiexec with others, else None
    (a plain run does not load MPI at all)."""
    if not any(name in os.environ for name in _MPIEXEC_VARIABLES):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise SystemExit("started by mpiexec, but mpi4py is missing: pip install 'netcl[mpi]'") from None
    world = MPI.COMM_WORLD
    return world if world.Get_size() > 1 else None


if __name__ == "__main__":
    raise SystemExit(main())
