"""Sweeps and dense Hessians sharded over every visible device, on JAX's own machinery.

Two kinds of work in quartic are embarrassingly parallel along one axis:

* a **sweep** — one function of many independent inputs (seeds × configurations, e.g. one
  trajectory per random quadratic problem), and
* the **columns of a dense Hessian** — ``H e_j`` for ``j = 1..n``, each one HVP.

Both are laid along a one-dimensional :class:`jax.sharding.Mesh` over all devices (axis
``"batch"``) and run with :func:`jax.shard_map`: each device evaluates ``vmap(fn)`` on its own
contiguous block of the inputs, with no communication, and the result is one global array sharded
the same way. An axis whose length is not a multiple of the device count is padded (by repeating
the last input, or with zero columns for the Hessian) and the padding is cut off again, so the
caller sees exactly ``len(inputs)`` results. Each result is computed by the same per-element program
as on one device, so sharded and single-device results agree to rounding (tested to 1e-12 in
float64 with 4 host devices, ``tests/test_distributed.py``).

Multi-host: call :func:`initialize` once per process (it wraps :func:`jax.distributed.initialize`);
:func:`device_mesh` then spans the devices of every process, inputs are placed with
:func:`jax.make_array_from_callback` (each process supplies the blocks its own devices hold, from the
same host copy of the inputs), and :func:`to_host` gathers a result on every process. Tested as
a real two-process job on one machine (CPU devices, gloo collectives):
``tests/test_distributed.py::test_two_processes_equal_one_process``.

On CPU, several host devices are simulated with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
set before JAX initialises (a way to test sharding; on a 2-core machine it does not add speed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quartic.core import curvature
from quartic.core.cache import memo
from quartic.core.errors import QuarticError

AXIS = "batch"
PyTree = Any


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs,
) -> bool:
    """Join a multi-process JAX job (one process per host); returns True if it was initialised.

    Without arguments it initialises only where a cluster is detected (``JAX_COORDINATOR_ADDRESS``
    set, or a SLURM/Kubernetes/MPI environment that :func:`jax.distributed.initialize` auto-detects
    via ``QUARTIC_DISTRIBUTED=1``) and is a no-op on a single machine. Call it before any other JAX
    call. Calling it twice is harmless. CPU devices use gloo collectives (chosen here if the
    installed JAX has none set), so a CPU-only multi-process job works too.
    """
    if getattr(initialize, "_done", False):
        return True
    explicit = coordinator_address is not None or num_processes is not None
    detected = "JAX_COORDINATOR_ADDRESS" in os.environ or os.environ.get("QUARTIC_DISTRIBUTED")
    if not (explicit or detected):
        return False
    _cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )
    initialize._done = True
    return True


def _cpu_collectives() -> None:
    """CPU devices of several processes talk through gloo; older JAX versions default to none."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # a JAX without the option: nothing to choose
        return
    if current in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def device_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = AXIS) -> Mesh:
    """A one-dimensional mesh over ``devices`` (default: every device of every process)."""
    devs = np.asarray(jax.devices() if devices is None else list(devices))
    if devs.size == 0:
        raise QuarticError("no devices to build a mesh over")
    return Mesh(devs.reshape(-1), (axis_name,))


def _leading(tree: PyTree) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(tree)}
    if not sizes or None in sizes or len(sizes) != 1:
        raise QuarticError(
            f"every input leaf must have the same leading (batch) axis; got lengths {sizes}"
        )
    return sizes.pop()


def _pad_to(tree: PyTree, size: int) -> PyTree:
    """Pad the leading axis to ``size`` by repeating the last element (valid inputs, cut later)."""

    def pad(x):
        x = np.asarray(x)
        extra = size - x.shape[0]
        if extra == 0:
            return x
        return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)], axis=0)

    return jax.tree.map(pad, tree)


def _place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (works multi-host)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x: PyTree) -> PyTree:
    """A sharded result as numpy arrays on this process (gathered across processes if needed)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, x)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)


def sweep(fn: Callable[..., PyTree], *args: PyTree, mesh: Mesh | None = None) -> PyTree:
    """``vmap(fn)(*args)`` with the leading axis of ``args`` sharded over ``mesh``.

    Args:
      fn: a function of one element of each argument (e.g. one problem and one seed's key),
        returning a pytree of arrays; pure and jit-compatible.
      args: pytrees whose leaves share one leading axis of length ``N`` (the runs). Build a
        seeds × configurations grid with :func:`product`.
      mesh: a 1-D mesh (default :func:`device_mesh` over all devices).

    Returns:
      The stacked results, leading axis ``N``, as global arrays sharded along ``"batch"``
      (use :func:`to_host` for numpy). Equal to ``jax.vmap(fn)(*args)`` on one device, to rounding.
    """
    mesh = device_mesh() if mesh is None else mesh
    axis = mesh.axis_names[0]
    n = _leading(args)
    k = mesh.devices.size
    padded = -(-n // k) * k
    args = _pad_to(args, padded)
    sharding = NamedSharding(mesh, P(axis))
    placed = jax.tree.map(lambda x: _place(x, sharding), args)
    run = _sweep_program(fn, mesh)
    out = run(*placed)
    return out if padded == n else jax.tree.map(lambda y: y[:n], out)


@memo(maxsize=32)
def _sweep_program(fn, mesh):
    """One jitted program per (fn, mesh): repeated sweeps of the same function compile once."""
    axis = mesh.axis_names[0]
    return jax.jit(
        jax.shard_map(
            lambda *xs: jax.vmap(fn)(*xs),
            mesh=mesh,
            in_specs=P(axis),
            out_specs=P(axis),
            check_vma=False,  # no collectives: each device's block is independent
        )
    )


def product(*axes: PyTree) -> tuple[PyTree, ...]:
    """The Cartesian product of several batched pytrees, flattened to one leading axis.

    ``product(keys[S], lrs[C])`` returns ``(keys[S*C], lrs[S*C])`` with the last axis varying
    fastest (row ``i*C + j`` is ``(keys[i], lrs[j])``), ready for :func:`sweep`; reshape a result to
    ``[S, C, ...]`` to get the grid back.
    """
    sizes = [_leading(a) for a in axes]
    grids = np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij")
    flat = [g.reshape(-1) for g in grids]
    return tuple(
        jax.tree.map(lambda x, i=i: np.asarray(x)[i], a) for a, i in zip(axes, flat, strict=True)
    )


def sharded_dense_hessian(
    loss_fn: Callable[[jax.Array], jax.Array],
    theta: jax.Array,
    chunk_size: int | None = 256,
    mesh: Mesh | None = None,
) -> jax.Array:
    """The exact Hessian ``[n, n]`` of a flat ``loss_fn`` at ``theta``, columns sharded over devices.

    Each device computes its block of columns ``H e_j`` ``chunk_size`` at a time (``vmap`` inside
    ``lax.map``, as :func:`quartic.core.curvature.dense_matrix` does on one device). Zero columns
    pad ``n`` to a multiple of the device count and are cut off. The result is sharded by columns.
    """
    mesh = device_mesh() if mesh is None else mesh
    axis = mesh.axis_names[0]
    if theta.ndim != 1:
        raise QuarticError(f"theta must be flat [n], got shape {theta.shape}")
    n = theta.shape[0]
    k = mesh.devices.size
    padded = -(-n // k) * k
    dtype = theta.dtype
    eye = np.eye(padded, n, dtype=dtype)  # rows are e_j; the padding rows are zero
    rows = _place(eye, NamedSharding(mesh, P(axis)))
    theta_r = _place(np.asarray(theta), NamedSharding(mesh, P()))
    cols = _hessian_program(loss_fn, mesh, min(chunk_size or padded // k, padded // k))(
        theta_r, rows
    )
    # cols[j] = H e_j = H[:, j] (row j of the symmetric H); transpose like dense_matrix does
    return cols[:n].T


@memo(maxsize=32)
def _hessian_program(loss_fn, mesh, batch_size):
    axis = mesh.axis_names[0]

    def block(th, e_rows):
        hv = curvature.hvp_fn(loss_fn, th)
        return lax.map(hv, e_rows, batch_size=batch_size)

    return jax.jit(
        jax.shard_map(block, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P(axis), check_vma=False)
    )


def shard_info(x: jax.Array) -> dict:
    """Where a result lives: ``{"num_devices": ..., "shard_shapes": [...]}`` (for tests, logs)."""
    shards = x.addressable_shards
    return {
        "num_devices": len(x.sharding.device_set),
        "shard_shapes": [tuple(s.data.shape) for s in shards],
    }


__all__ = [
    "AXIS",
    "device_mesh",
    "initialize",
    "product",
    "shard_info",
    "sharded_dense_hessian",
    "sweep",
    "to_host",
]
