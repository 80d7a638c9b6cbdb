"""RMSProp against torch.optim.RMSprop and an extended-precision reference.

Tolerance: the data come from `well_conditioned`, so no operation of the update
subtracts nearly equal numbers and rounding errors are not amplified. One step is about
ten correctly rounded operations, so a float32 step differs from exact arithmetic by a few
units of float32's epsilon, relative; torch orders some operations differently (it
interpolates the gradient average with lerp), which adds a few more. Measured over 20
steps and every flag combination: at most 3.3 eps from torch (both dtypes) and 2.5 eps
from the reference. RTOL = 16 eps leaves a margin of about 5x while still catching any
real change to the update (eps moved inside the square root changes results by ~0.5%).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from netcl import Parameter
from netcl.optim import RMSProp
from tests.kinds import KIND_IDS, KINDS, Kind
from tests.reference import FLAG_COMBINATIONS, WideRMSProp, flag_id, well_conditioned

DTYPES = [np.float32, np.float64]
STEPS = 20
LR = 1e-3


def rtol(dtype: Any) -> float:
    return 16 * float(np.finfo(dtype).eps)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=[flag_id(f) for f in FLAG_COMBINATIONS])
def test_matches_torch_and_reference(
    kind: Kind, dtype: Any, flags: dict[str, Any], queue: Any, rng: np.random.Generator
) -> None:
    p0, grads = well_conditioned(rng, (37, 29), dtype, maximize=flags["maximize"], steps=STEPS)
    param = Parameter(kind.make(queue, p0))
    optimizer = RMSProp([param], lr=LR, **flags)
    twin = torch.tensor(p0, requires_grad=True)
    torch_optimizer = torch.optim.RMSprop([twin], lr=LR, **flags)
    reference = WideRMSProp(p0, lr=LR, **flags)
    for grad in grads:
        param.grad = kind.make(queue, grad)
        optimizer.step()
        twin.grad = torch.tensor(grad)
        torch_optimizer.step()
        reference.step(grad)

    got = kind.get(param.data)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, twin.detach().numpy(), rtol=rtol(dtype), atol=0)
    np.testing.assert_allclose(got, reference.p, rtol=rtol(dtype), atol=0)
    state: dict[str, Any] = dict(optimizer.state[id(param)])
    torch_state = torch_optimizer.state[twin]
    assert state["step"] == STEPS
    names = ["square_avg"] + ["momentum_buffer"] * (flags["momentum"] > 0) + ["grad_avg"] * flags["centered"]
    assert sorted(k for k in state if k != "step") == sorted(names)
    for name in names:
        np.testing.assert_allclose(
            kind.get(state[name]), torch_state[name].numpy(), rtol=rtol(dtype), atol=0, err_msg=name
        )


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", [(0,), (), (1,), (7,), (1023,), (10007,), (3, 5), (4, 1, 6)], ids=str)
@pytest.mark.parametrize("flags", [{}, {"momentum": 0.5, "centered": True, "weight_decay": 0.01}], ids=["plain", "all"])
def test_every_size_matches_torch(
    kind: Kind, dtype: Any, shape: tuple[int, ...], flags: dict[str, Any], queue: Any, rng: np.random.Generator
) -> None:
    p0, grads = well_conditioned(rng, shape, dtype, maximize=False, steps=3)
    param = Parameter(kind.make(queue, p0))
    optimizer = RMSProp([param], lr=LR, **flags)
    twin = torch.tensor(p0, requires_grad=True)
    torch_optimizer = torch.optim.RMSprop([twin], lr=LR, **flags)
    for grad in grads:
        param.grad = kind.make(queue, grad)
        optimizer.step()
        twin.grad = torch.tensor(grad)
        torch_optimizer.step()
    got = kind.get(param.data)
    assert got.shape == shape
    np.testing.assert_allclose(got, twin.detach().numpy(), rtol=rtol(dtype), atol=0)
    if kind.fused and kind.name == "pyopencl-offset":
        # the elements around the view are untouched
        base = param.data.base_data
        whole = np.empty(base.size // np.dtype(dtype).itemsize, dtype)
        import pyopencl as cl

        cl.enqueue_copy(queue, whole, base)
        assert (whole[:3] == 7).all() and (whole[3 + p0.size : 6 + p0.size] == 7).all()


def test_fortran_ordered_pyopencl_arrays(queue: Any, rng: np.random.Generator) -> None:
    import pyopencl.array as cl_array

    p0, grads = well_conditioned(rng, (6, 9), np.float32, maximize=False, steps=4)
    param = Parameter(cl_array.to_device(queue, np.asfortranarray(p0)))
    assert param.data.flags.f_contiguous and not param.data.flags.c_contiguous
    optimizer = RMSProp([param], lr=LR, momentum=0.9)
    twin = torch.tensor(p0, requires_grad=True)
    torch_optimizer = torch.optim.RMSprop([twin], lr=LR, momentum=0.9)
    for grad in grads:
        param.grad = cl_array.to_device(queue, np.asfortranarray(grad))
        optimizer.step()
        twin.grad = torch.tensor(grad)
        torch_optimizer.step()
    np.testing.assert_allclose(param.data.get(), twin.detach().numpy(), rtol=rtol(np.float32), atol=0)
    saved = optimizer.state_dict()["state"][0]["square_avg"]
    np.testing.assert_allclose(saved, torch_optimizer.state[twin]["square_avg"].numpy(), rtol=rtol(np.float32))


def test_torch_module_parameters(rng: np.random.Generator) -> None:
    """torch.nn.Module.parameters() are parameters as they are."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    optimizer = RMSProp(model.parameters(), lr=1e-2, momentum=0.5)
    torch_optimizer = torch.optim.RMSprop(twin.parameters(), lr=1e-2, momentum=0.5)
    x = torch.tensor(rng.standard_normal((16, 5)), dtype=torch.float32)
    for _ in range(5):
        for net, opt in ((model, optimizer), (twin, torch_optimizer)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_schedule_set_between_steps_is_followed_like_torch(queue: Any, rng: np.random.Generator) -> None:
    """Hyperparameters changed in `param_groups` between steps (a learning-rate schedule;
    the same value set again as another object; an unchanged value) apply from the next
    step, as in torch."""
    import pyopencl.array as cl_array

    p0, grads = well_conditioned(rng, (6, 9), np.float32, maximize=False, steps=8)
    param = Parameter(cl_array.to_device(queue, p0))
    optimizer = RMSProp([param], lr=LR)
    twin = torch.tensor(p0, requires_grad=True)
    torch_optimizer = torch.optim.RMSprop([twin], lr=LR)
    schedule = [(1e-3, 0.99), (1e-3, 0.99), (2e-3, 0.99), (float("2e-3"), 0.9), (5e-4, 0.9), (5e-4, 0.95)]
    for grad, (lr, alpha) in zip(grads, [*schedule, schedule[-1], schedule[-1]], strict=True):
        for group in (optimizer.param_groups[0], torch_optimizer.param_groups[0]):
            group["lr"], group["alpha"] = lr, alpha
        param.grad = cl_array.to_device(queue, grad)
        optimizer.step()
        twin.grad = torch.tensor(grad)
        torch_optimizer.step()
        np.testing.assert_allclose(param.data.get(), twin.detach().numpy(), rtol=rtol(np.float32), atol=0)
