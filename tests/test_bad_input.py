"""Bad input gets a clear TypeError or ValueError, and a failed call changes nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import array_api_strict
import ml_dtypes
import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
import torch

from netcl import Parameter
from netcl.optim import RMSProp
from tests.kinds import KIND_IDS, KINDS, Kind

F32 = np.float32


def ok() -> Parameter[Any]:
    return Parameter(np.ones(3, F32))


HYPERPARAMETER_CASES: list[tuple[str, object, type[Exception]]] = [
    ("lr", -1e-3, ValueError),
    ("lr", math.nan, ValueError),
    ("lr", math.inf, ValueError),
    ("lr", "0.1", TypeError),
    ("lr", None, TypeError),
    ("lr", True, TypeError),
    ("alpha", -0.1, ValueError),
    ("alpha", 1.0, ValueError),
    ("alpha", 1.5, ValueError),
    ("alpha", math.nan, ValueError),
    ("eps", 0.0, ValueError),
    ("eps", -1e-8, ValueError),
    ("eps", math.inf, ValueError),
    ("weight_decay", -0.1, ValueError),
    ("weight_decay", math.inf, ValueError),
    ("weight_decay", math.nan, ValueError),
    ("momentum", -0.5, ValueError),
    ("momentum", 1.0, ValueError),
    ("momentum", math.nan, ValueError),
    ("momentum", [0.9], TypeError),
    ("centered", "yes", TypeError),
    ("centered", 1, TypeError),
    ("maximize", 0, TypeError),
]


@pytest.mark.parametrize(
    ("name", "value", "error"), HYPERPARAMETER_CASES, ids=[f"{n}={v!r}" for n, v, _ in HYPERPARAMETER_CASES]
)
def test_bad_hyperparameters(name: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=name) as caught:
        RMSProp([ok()], **{name: value})  # type: ignore[arg-type]
    assert repr(value)[:6] in str(caught.value) or type(value).__name__ in str(caught.value)
    # the same value in a param group
    with pytest.raises(error, match=rf"param_groups\[0\]: {name}"):
        RMSProp([{"params": [ok()], name: value}])  # type: ignore[list-item]


def test_hyperparameter_message_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"Invalid alpha value: 1.5 \(allowed: 0.0 <= alpha < 1.0\)"):
        RMSProp([ok()], alpha=1.5)


def test_boundary_values_are_accepted() -> None:
    RMSProp([ok()], lr=0.0, alpha=0.0, eps=1e-300, weight_decay=0.0, momentum=0.0)
    RMSProp([ok()], lr=np.float32(0.1), alpha=np.float64(0.5), centered=np.bool_(True))  # type: ignore[arg-type]


def _used_generator() -> object:
    params = (Parameter(np.ones(3, np.float32)) for _ in range(2))
    RMSProp(params)  # takes both
    return params


PARAMS_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("empty", lambda: [], ValueError, "empty parameter list"),
    ("used generator", _used_generator, ValueError, "yielded nothing: was it used before"),
    ("bare numpy array", lambda: np.ones(3, F32), TypeError, "single numpy.ndarray"),
    ("single parameter", lambda: ok(), TypeError, "single netcl._parameter.Parameter"),
    ("set", lambda: {ok()}, TypeError, "got a set"),
    ("one dict", lambda: {"params": [ok()]}, TypeError, "got one dict"),
    ("not iterable", lambda: 3, TypeError, "got builtins.int"),
    ("a string", lambda: "weights", TypeError, "got builtins.str"),
    ("arrays in a list", lambda: [np.ones(3, F32)], TypeError, r"wrap the array in netcl.Parameter"),
    ("numbers", lambda: [1.0, 2.0], TypeError, "not a parameter"),
    ("objects", lambda: [object()], TypeError, "not a parameter"),
    ("duplicate", lambda: [p := ok(), p], ValueError, "more than once"),
    ("duplicate across groups", lambda: [{"params": [p := ok()]}, {"params": [p]}], ValueError, "more than once"),
    ("mixed", lambda: [ok(), {"params": [ok()]}], TypeError, "mixes"),
    ("unknown group key", lambda: [{"params": [ok()], "betas": 0.9}], ValueError, "unknown key.*'betas'"),
    ("group without params", lambda: [{"lr": 0.1}], ValueError, "no 'params'"),
    ("nested group", lambda: [{"params": [{"params": [ok()]}]}], TypeError, "cannot be nested"),
    ("group params is a set", lambda: [{"params": {ok()}}], TypeError, "got a set"),
    ("int array", lambda: [Parameter(np.arange(3))], TypeError, "dtype int64"),
    ("bool array", lambda: [Parameter(np.ones(3, bool))], TypeError, "dtype bool"),
    ("complex array", lambda: [Parameter(np.ones(3, np.complex64))], TypeError, "dtype complex64"),
    ("float8 array", lambda: [Parameter(np.ones(3, ml_dtypes.float8_e4m3fn))], TypeError, "dtype float8_e4m3fn"),
    ("int torch tensor", lambda: [Parameter(torch.arange(3))], TypeError, "dtype torch.int64"),
    ("read-only numpy", lambda: [Parameter(np.broadcast_to(np.ones(1, F32), (3,)))], ValueError, "read-only"),
    ("data not an array", lambda: [type("P", (), {"data": [1.0], "grad": None})()], TypeError, "not an array"),
]


@pytest.mark.parametrize(("params", "error", "match"), [c[1:] for c in PARAMS_CASES], ids=[c[0] for c in PARAMS_CASES])
def test_bad_params(params: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RMSProp(params())  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [[1.0, 2.0], "abc", 3.0, None], ids=["list", "str", "float", "None"])
def test_parameter_rejects_non_arrays(data: object) -> None:
    with pytest.raises(TypeError, match="data is a .* not an array netcl can optimize"):
        Parameter(data)  # type: ignore[type-var]


def test_opencl_parameter_problems(queue: cl.CommandQueue) -> None:
    no_queue = cl_array.to_device(queue, np.ones(4, F32)).with_queue(None)
    with pytest.raises(ValueError, match="has no queue"):
        RMSProp([Parameter(no_queue)])
    strided = cl_array.to_device(queue, np.ones(8, F32))[::2]
    with pytest.raises(ValueError, match="not contiguous"):
        RMSProp([Parameter(strided)])
    ints = cl_array.to_device(queue, np.ones(4, np.int32))
    with pytest.raises(TypeError, match="dtype int32"):
        RMSProp([Parameter(ints)])


def _snapshot(opt: RMSProp, params: list[Parameter[Any]], kind: Kind) -> list[Any]:
    data = [kind.get(p.data).tobytes() for p in params]
    state = [
        (key, {name: kind.get(value).tobytes() if name != "step" else value for name, value in entry.items()})
        for key, entry in sorted(opt.state.items())
    ]
    return [data, state]


def _other_kind_array(kind: Kind, queue: cl.CommandQueue, shape: tuple[int, ...]) -> Any:
    if kind.fused:
        return np.ones(shape, F32)
    if kind.name == "torch":
        return np.ones(shape, F32)
    return torch.ones(shape)


def _other_dtype(dtype: Any) -> Any:
    return np.float64 if dtype == np.float32 else np.float32


GRAD_CASES: list[tuple[str, Callable[[Kind, cl.CommandQueue, Any], Any], type[Exception], str]] = [
    ("wrong shape", lambda k, q, dt: k.make(q, np.ones(5, dt)), ValueError, r"has shape \(5,\)"),
    ("wrong dtype", lambda k, q, dt: k.make(q, np.ones((2, 3), _other_dtype(dt))), TypeError, "dtype"),
    ("other library", lambda k, q, dt: _other_kind_array(k, q, (2, 3)), TypeError, "same library|OpenCL array"),
    ("not an array", lambda k, q, dt: [[1.0] * 3] * 2, TypeError, "grad is a builtins.list"),
]


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("make_grad", "error", "match"), [c[1:] for c in GRAD_CASES], ids=[c[0] for c in GRAD_CASES])
def test_a_failed_step_changes_nothing(
    kind: Kind,
    dtype: Any,
    make_grad: Callable[[Kind, cl.CommandQueue, Any], Any],
    error: type[Exception],
    match: str,
    queue: cl.CommandQueue,
    rng: np.random.Generator,
) -> None:
    params = [Parameter(kind.make(queue, rng.standard_normal((2, 3)).astype(dtype))) for _ in range(3)]
    fresh = Parameter(kind.make(queue, rng.standard_normal((2, 3)).astype(dtype)))
    opt = RMSProp([*params, fresh], lr=0.1, momentum=0.9, centered=True)
    for p in params:
        p.grad = kind.make(queue, rng.standard_normal((2, 3)).astype(dtype))
    opt.step()
    before = _snapshot(opt, [*params, fresh], kind)
    # two good gradients (one for a parameter without state yet), then a bad one
    params[0].grad = kind.make(queue, rng.standard_normal((2, 3)).astype(dtype))
    fresh.grad = kind.make(queue, rng.standard_normal((2, 3)).astype(dtype))
    params[2].grad = make_grad(kind, queue, dtype)
    with pytest.raises(error, match=match) as caught:
        opt.step()
    assert r"param_groups[0]['params'][2].grad" in str(caught.value)
    assert id(fresh) not in opt.state
    assert _snapshot(opt, [*params, fresh], kind) == before


def test_grad_in_another_context_is_refused(queue: cl.CommandQueue) -> None:
    other = cl.Context(devices=[queue.device])
    other_queue = cl.CommandQueue(other)
    p = Parameter(cl_array.to_device(queue, np.ones(4, F32)), cl_array.to_device(other_queue, np.ones(4, F32)))
    with pytest.raises(ValueError, match="another OpenCL context"):
        RMSProp([p]).step()
    np.testing.assert_array_equal(p.data.get(), np.ones(4, F32))


def test_transposed_opencl_grad_is_refused(queue: cl.CommandQueue) -> None:
    """A Fortran-ordered gradient of a C-ordered parameter would pair the wrong elements."""
    host = np.arange(16, dtype=F32).reshape(4, 4)
    p = Parameter(cl_array.to_device(queue, host), cl_array.to_device(queue, host).T)
    with pytest.raises(ValueError, match="in F order but its parameter is in C order"):
        RMSProp([p]).step()
    np.testing.assert_array_equal(p.data.get(), host)


def test_transposed_numpy_grad_is_handled_correctly() -> None:
    """The array-API path works on logical elements, so views are fine there."""
    host = np.arange(1, 17, dtype=F32).reshape(4, 4)
    grad = np.ascontiguousarray(host.T).T.T  # a C array whose transpose is F-ordered
    a = Parameter(host.copy(), grad.T)
    b = Parameter(host.copy(), np.array(grad.T, order="C"))
    RMSProp([a], lr=0.1).step()
    RMSProp([b], lr=0.1).step()
    np.testing.assert_array_equal(a.data, b.data)


def test_strict_and_numpy_grads_do_not_mix() -> None:
    p = Parameter(array_api_strict.ones(3, dtype=array_api_strict.float32), np.ones(3, F32))
    with pytest.raises(TypeError, match="same library"):
        RMSProp([p]).step()


def test_closure_must_be_callable() -> None:
    with pytest.raises(TypeError, match="closure must be callable"):
        RMSProp([ok()]).step(3)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "change", ["read-only data", "reshaped gradient", "torch gradient as a view", "read-only state", "reshaped state"]
)
def test_a_host_array_changed_in_place_is_checked_again(change: str) -> None:
    """A step skips the checks of the very same arrays only while their fingerprint
    (shape, strides, dtype, writeability ...) is the same: an array changed in place
    between steps is checked again, and the step refused."""
    if change == "torch gradient as a view":
        param: Parameter[Any] = Parameter(torch.ones(6), torch.ones(6))
    else:
        param = Parameter(np.ones(6, F32), np.ones(6, F32))
    optimizer = RMSProp([param])
    optimizer.step()
    optimizer.step()  # its state made at the first: these very arrays now pass unchecked

    def values() -> Any:
        data = param.data
        return data.numpy().copy() if isinstance(data, torch.Tensor) else np.array(data, copy=True)

    before = values()
    state = {k: np.array(np.asarray(v), copy=True) for k, v in optimizer.state[param].items() if k != "step"}
    assert param.grad is not None
    if change == "read-only data":
        param.data.flags.writeable = False
        words = r"\['params'\]\[0\]\.data is read-only; netcl updates parameters in place"
    elif change == "reshaped gradient":
        param.grad.shape = (2, 3)
        words = r"grad has shape \(2, 3\), but its parameter has shape \(6,\)"
    elif change == "read-only state":
        cast(np.ndarray, optimizer.state[param]["square_avg"]).flags.writeable = False
        words = r"state\['square_avg'\] of param_groups\[0\]\['params'\]\[0\] is read-only"
    elif change == "reshaped state":
        cast(np.ndarray, optimizer.state[param]["square_avg"]).shape = (3, 2)
        words = r"state\['square_avg'\] .* has shape \(3, 2\), but its parameter has shape \(6,\)"
    else:
        param.grad.set_(param.grad.untyped_storage(), 0, (3, 2), (2, 1))  # the same object, reshaped
        words = r"grad has shape \(3, 2\), but its parameter has shape \(6,\)"
    with pytest.raises(ValueError, match=words):
        optimizer.step()
    assert np.array_equal(values(), before)
    after: dict[str, Any] = dict(optimizer.state[param])
    for name, value in state.items():
        assert np.array_equal(np.asarray(after[name]).ravel(), value.ravel())  # (reshaped or not)


@pytest.mark.parametrize("change", ["reshaped parameter", "reshaped state"])
def test_a_torch_parameter_changed_in_place_is_checked_again(change: str) -> None:
    """torch's own parameters (whose `data` is a new tensor at each access): a step
    compares each parameter's memory and layout, and its state buffers' fingerprints,
    so a parameter or a state buffer reshaped in place between steps is checked
    again, and the step refused."""
    param = torch.nn.Parameter(torch.ones(6))
    param.grad = torch.ones(6)
    optimizer = RMSProp([param])
    optimizer.step()
    optimizer.step()
    state = cast(torch.Tensor, optimizer.state[param]["square_avg"])
    with torch.no_grad():
        if change == "reshaped parameter":
            param.set_(param.untyped_storage(), 0, (3, 2), (2, 1))
            words = r"grad has shape \(6,\), but its parameter has shape \(3, 2\)"
        else:
            state.set_(state.untyped_storage(), 0, (3, 2), (2, 1))
            words = r"state\['square_avg'\] .* has shape \(3, 2\), but its parameter has shape \(6,\)"
    before, kept = param.detach().clone(), state.detach().clone()
    with pytest.raises(ValueError, match=words):
        optimizer.step()
    assert torch.equal(param.detach(), before) and torch.equal(state.detach(), kept)
    assert optimizer.state[param]["step"] == 2


def _shared_base(kind: str, queue: cl.CommandQueue) -> Callable[[int, int], Any]:
    """Views of one array of 14 float32 values (`view(start, stop)`), of `kind`."""
    values = np.linspace(1, 2, 14).astype(F32)
    base: Any = (
        torch.tensor(values) if kind == "torch" else cl_array.to_device(queue, values) if kind == "pyopencl" else values
    )
    return lambda start, stop: base[start:stop]


def _fresh(kind: str, queue: cl.CommandQueue, n: int = 6) -> Any:
    values = np.full(n, 0.5, F32)
    return (
        torch.tensor(values) if kind == "torch" else cl_array.to_device(queue, values) if kind == "pyopencl" else values
    )


def _bits(x: Any) -> bytes:
    return bytes((x.get() if isinstance(x, cl_array.Array) else np.asarray(x)).tobytes())


SHARED_CASES = {
    # (the parameters' arrays and gradients from views of one array, and a change made
    # before a second step; the names the error gives)
    "two parameters overlap": ((0, 6), (5, 11), None, ["[1].data", "[0].data"]),
    "a gradient overlaps its own parameter": ((0, 6), (7, 13), "grad 0 = view(1, 7)", ["[0].grad", "[0].data"]),
    "a gradient is another parameter's array": ((0, 6), (7, 13), "grad 1 = data 0", ["[1].grad", "[0].data"]),
    "a state buffer is another parameter's array": ((0, 6), (7, 13), "state 1 = data 0", ["[1]", "[0].data"]),
}


SHARED_RUNS = [
    (kind, case, when)
    for kind in ("numpy", "torch", "pyopencl")
    for case, (_, _, change, _) in SHARED_CASES.items()
    for when in ("first step", "later step")
    # (overlapping parameters fail the first step: no later one; a kept plan takes a new
    # numpy or torch gradient by its fingerprint, without comparing its memory, see
    # `Optimizer._plans`: at a later step only pyopencl's are compared)
    if when == "first step" or (change is not None and (kind == "pyopencl" or not change.startswith("grad")))
]


@pytest.mark.parametrize(("kind", "case", "when"), SHARED_RUNS)
def test_arrays_a_step_writes_may_not_share_memory(kind: str, case: str, when: str, queue: cl.CommandQueue) -> None:
    # a launch updates many parameters at once: two arrays it writes in the same memory,
    # or a gradient in the memory of an array it writes (but its own parameter's, which
    # it reads at the very element it writes), would be read and written in no set
    # order; a step refuses them, and changes nothing
    first, second, change, names = SHARED_CASES[case]
    view = _shared_base(kind, queue)
    params = [Parameter(view(*first), _fresh(kind, queue)), Parameter(view(*second), _fresh(kind, queue))]
    opt = RMSProp(params, lr=0.1)
    if when == "later step":
        for _ in range(3):  # (the plan kept, comparing the gradients by their fingerprints where it can)
            opt.step()
    if change == "grad 0 = view(1, 7)":
        params[0].grad = view(1, 7)
    elif change == "grad 1 = data 0":
        params[1].grad = params[0].data
    elif change == "state 1 = data 0":
        if when == "first step":
            opt.state[params[1]] = {"step": 0, "square_avg": params[0].data}
        else:
            opt.state[params[1]]["square_avg"] = params[0].data
    before = [_bits(x) for p in params for x in (p.data, p.grad)]
    for _ in range(2):  # (and again: a failed step leaves nothing taken as checked)
        with pytest.raises(ValueError, match="shares memory with") as caught:
            opt.step()
        message = str(caught.value)
        assert all(f"param_groups[0]['params']{name}" in message for name in names), message
        assert [_bits(x) for p in params for x in (p.data, p.grad)] == before


@pytest.mark.parametrize("kind", ["numpy", "torch", "pyopencl"])
def test_arrays_next_to_each_other_and_a_gradient_that_is_its_parameter_are_taken(
    kind: str, queue: cl.CommandQueue
) -> None:
    # parameters side by side in one array (flat storage, laid out by hand), one whose
    # gradient is its own array, and a gradient that is also another parameter's (only
    # read): the same bits as parameters and gradients each in memory of its own
    results = []
    for shared in (True, False):
        view = _shared_base(kind, queue) if shared else None
        arrays = (
            [view(0, 6), view(6, 12), view(12, 14)]
            if view
            else [_copy_of(_shared_base(kind, queue)(a, b)) for a, b in ((0, 6), (6, 12), (12, 14))]
        )
        params = [Parameter(x) for x in arrays]
        gradient = _fresh(kind, queue)
        params[0].grad = params[0].data  # (in both: the gradient changes with the parameter)
        params[1].grad = gradient if shared else _copy_of(gradient)
        params[2].grad = gradient[:2] if shared else _copy_of(gradient[:2])
        opt = RMSProp(params, lr=0.1)
        for _ in range(3):
            opt.step()
        results.append([_bits(p.data) for p in params])
    assert results[0] == results[1]


def _copy_of(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


def test_a_parameter_put_in_two_places_by_a_list_change_is_refused() -> None:
    # the constructor and add_param_group refuse a parameter given twice; a param
    # group's list changed in place afterwards is checked at the step, which changes
    # nothing
    a = Parameter(np.ones(3, F32), np.full(3, 0.5, F32))
    b = Parameter(np.ones(3, F32), np.full(3, 0.5, F32))
    opt = RMSProp([a], lr=0.1)
    opt.add_param_group({"params": [b]})
    opt.step()
    before = [a.data.copy(), b.data.copy()]
    opt.param_groups[0]["params"][0] = b
    with pytest.raises(
        ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is param_groups\[0\]\['params'\]\[0\] again"
    ):
        opt.step()
    assert [x.tobytes() for x in (a.data, b.data)] == [x.tobytes() for x in before]
