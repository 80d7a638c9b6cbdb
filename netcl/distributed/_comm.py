"""The collectives netcl's distributed layer runs, on host views of the user's arrays.

Every array reaches MPI through its backend's `host_views`: numpy arrays and CPU
tensors as they are, OpenCL buffers mapped to the host (one mapping per run of arrays
that follow each other in a buffer). Views that follow each other in memory travel as
one message where they are; the others are packed into buckets.

Each collective that could block is preceded by `agree`, in which every rank says
whether its part of the call is valid: a rank with bad input makes every rank raise in
the same call, before anything is written, instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from netcl._backends import backend_for
from netcl._backends.base import HostViews

try:
    from mpi4py import MPI
except ImportError as error:  # pragma: no cover (the extra is installed in tests)
    raise ImportError(
        "netcl.distributed needs mpi4py and an MPI library: pip install 'netcl[mpi]' "
        "(mpi4py, and MPICH's wheel for a machine without an MPI)"
    ) from error

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "MPI",
    "PACK_BELOW",
    "agree",
    "allreduce_mean",
    "communicator",
    "host_views",
    "in_buckets",
    "signature",
]

_MPI_TYPES = {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}
"""MPI's own types, for which MPI.SUM is defined."""

DEFAULT_BUCKET_BYTES = 25 * 2**20
"""The most bytes of small arrays packed into one message (torch DDP's default)."""

PACK_BELOW = 2**18
"""Runs of arrays smaller than this many bytes are packed with others into one message
(their time is mostly MPI's latency); larger ones are sent from where they are."""


def communicator(comm: MPI.Comm | None, where: str = "comm") -> MPI.Comm:
    """`comm`, or `MPI.COMM_WORLD` for None; a TypeError for anything else."""
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm) or isinstance(comm, MPI.Intercomm):
        raise TypeError(
            f"{where} must be an mpi4py intracommunicator (MPI.COMM_WORLD or one split from it), got {comm!r}"
        )
    if comm == MPI.COMM_NULL:
        raise ValueError(f"{where} is MPI.COMM_NULL")
    return comm


def signature(description: object) -> bytes:
    """A short digest of `description` (a structure of plain values, its `repr` stable)."""
    return hashlib.blake2b(repr(description).encode(), digest_size=16).digest()


def agree(comm: MPI.Comm, what: str, check: Callable[[], object], changed: str = "nothing") -> None:
    """Run `check` on every rank, and raise on every rank if it raised on any, or if the
    ranks' results differ (they describe what each rank is about to send: shapes,
    dtypes, hyperparameters). One small all-gather, which every rank reaches whatever
    its own check did: so no rank is left waiting in a later collective.

    The rank whose check raised re-raises its own exception; the others raise the same
    kind (TypeError or ValueError, else RuntimeError) naming that rank and its message,
    and what the call `changed` before it (nothing, but where said).
    """
    failure: Exception | None = None
    description: object = None
    try:
        description = check()
    except Exception as error:  # noqa: BLE001 (every failure must reach the other ranks)
        failure = error
    digest = signature(description)
    mine = None if failure is None else (type(failure).__name__, str(failure))
    verdicts: list[tuple[tuple[str, str] | None, bytes]] = comm.allgather((mine, digest))
    failed = [(rank, verdict) for rank, (verdict, _) in enumerate(verdicts) if verdict is not None]
    if failed:
        if failure is not None:
            raise failure
        rank, (kind, message) = failed[0]
        others = f" (and on rank(s) {', '.join(str(r) for r, _ in failed[1:])})" if len(failed) > 1 else ""
        error_type: type[Exception] = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
        raise error_type(
            f"{what} failed on rank {rank}{others}, so on every rank, and changed {changed}: {kind}: {message}"
        )
    digests = [digest for _, digest in verdicts]
    if len(set(digests)) > 1:
        # the ranks disagree: a second all-gather (every rank knows it is needed) names how
        descriptions: list[object] = comm.allgather(description)
        differing = [rank for rank, d in enumerate(descriptions) if d != descriptions[0]]
        raise ValueError(
            f"{what}: the ranks do not agree, so the call changed {changed} on any rank. Rank 0 has "
            f"{_brief(descriptions[0])}; rank {differing[0]} has {_brief(descriptions[differing[0]])}"
        )


def _brief(description: object, limit: int = 600) -> str:
    text = repr(description)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def host_views(arrays: Sequence[Any], write: bool) -> Iterator[HostViews]:
    """`arrays` (of any backends) in host memory, for the time of a `with` block (see
    `Backend.host_views`)."""
    views: list[npt.NDArray[Any]] = []
    runs: list[npt.NDArray[Any]] = []
    with contextlib.ExitStack() as stack:
        start = 0
        while start < len(arrays):
            backend = backend_for(arrays[start], f"arrays[{start}]")
            end = start + 1
            while end < len(arrays) and backend_for(arrays[end], f"arrays[{end}]") is backend:
                end += 1
            seen = stack.enter_context(backend.host_views(arrays[start:end], write))
            views += seen.arrays
            runs += seen.runs
            start = end
        yield HostViews(views, runs)


def _mean_in_place(comm: MPI.Comm, buffer: npt.NDArray[Any]) -> None:
    """Replace `buffer` (flat, the same length on every rank) by its mean over the ranks,
    the very same bits on every rank.

    Two ranks sum one pair of values, the same in either order: MPI's all-reduce. With
    more, MPI may add in another order on each rank, so each rank reduces one block
    (reduce-scatter) and divides it, and every rank gathers every block: each value is
    computed on one rank only.
    """
    if buffer.dtype not in _MPI_TYPES:
        # float16 and bfloat16, which MPI cannot sum: the mean in float32 (the dtype
        # their update is computed in), rounded to nearest even, the same on every rank
        wide = buffer.astype(np.float32)
        _mean_in_place(comm, wide)
        buffer[...] = wide.astype(buffer.dtype)
        return
    size = comm.Get_size()
    kind = _MPI_TYPES[buffer.dtype]
    if size == 2:
        comm.Allreduce(MPI.IN_PLACE, [buffer, kind], op=MPI.SUM)
        np.divide(buffer, np.asarray(size, buffer.dtype), out=buffer)
    else:
        _mean_by_blocks(comm, buffer)


def _mean_by_blocks(comm: MPI.Comm, buffer: npt.NDArray[Any]) -> None:
    size = comm.Get_size()
    counts = [len(buffer) // size + (1 if rank < len(buffer) % size else 0) for rank in range(size)]
    displacements = [sum(counts[:rank]) for rank in range(size)]
    block = np.empty(counts[comm.Get_rank()], buffer.dtype)
    kind = _MPI_TYPES[buffer.dtype]
    comm.Reduce_scatter([buffer, kind], [block, kind], counts, op=MPI.SUM)
    np.divide(block, np.asarray(size, buffer.dtype), out=block)
    comm.Allgatherv([block, kind], [buffer, (counts, displacements), kind])


def in_buckets(
    runs: Sequence[npt.NDArray[Any]],
    bucket: npt.NDArray[Any],
    call: Callable[[npt.NDArray[Any]], None],
    write_back: bool,
) -> None:
    """Pass `runs` (flat arrays of `bucket`'s dtype, each no larger than it) through
    `call`, packed into `bucket` as many at a time as fit; with `write_back`, copy what
    `call` left in the bucket back into them."""
    packed: list[npt.NDArray[Any]] = []
    filled = 0
    pending: list[npt.NDArray[Any] | None] = [*runs, None]
    for item in pending:
        if filled and (item is None or filled + item.size > bucket.size):
            call(bucket[:filled])
            if write_back:
                start = 0
                for done in packed:
                    done[...] = bucket[start : start + done.size]
                    start += done.size
            packed, filled = [], 0
        if item is not None:
            bucket[filled : filled + item.size] = item
            packed.append(item)
            filled += item.size


def allreduce_mean(
    comm: MPI.Comm,
    runs: Sequence[npt.NDArray[Any]],
    bucket_bytes: int,
    buckets: dict[np.dtype[Any], npt.NDArray[Any]],
) -> None:
    """Average each of `runs` (flat host arrays, `HostViews.runs`) over the ranks of
    `comm`, in place: each goes as one message from where it is, but those of fewer
    than `PACK_BELOW` bytes, which are packed by dtype into buckets of at most
    `bucket_bytes`. `buckets` keeps the packing buffers from one call to the next."""
    if comm.Get_size() == 1:
        return
    small: dict[np.dtype[Any], list[npt.NDArray[Any]]] = {}
    for run in runs:
        if run.nbytes >= min(PACK_BELOW, bucket_bytes) or len(runs) == 1:
            _mean_in_place(comm, run)
        else:
            small.setdefault(run.dtype, []).append(run)
    for dtype in sorted(small, key=str):  # every rank walks the dtypes in one order
        runs = small[dtype]
        needed = min(max(bucket_bytes // dtype.itemsize, 1), sum(run.size for run in runs))
        bucket = buckets.get(dtype)
        if bucket is None or bucket.size < needed:
            bucket = buckets[dtype] = np.empty(needed, dtype)
        in_buckets(runs, bucket[:needed], lambda part: _mean_in_place(comm, part), write_back=True)
