"""Checkpoints of parameter pytrees: orbax for the arrays, JSON for what describes them.

A checkpoint is a directory holding ``params/`` (an orbax ``StandardCheckpointer`` checkpoint of
the parameters, one array per ``/``-joined pytree path, e.g. ``blocks/0/attn/q_proj/kernel``) and
``meta.json`` (anything JSON: the model config, how it was trained, its report). Orbax commits
``params/`` atomically and ``meta.json`` is renamed into place after it, so a directory with a
``meta.json`` always holds a complete checkpoint; a crash mid-save leaves none. Directories from
quartic ≤ 0.1 (``params.npz`` beside ``meta.json``) are still read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from quartic.core.errors import QuarticError
from quartic.core.pytree import path_name

__all__ = ["exists", "load", "lock", "read_meta", "save"]


def _flat(tree: Any) -> dict[str, Any]:
    return {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def exists(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete checkpoint."""
    d = Path(directory)
    return (d / "meta.json").exists() and ((d / "params").is_dir() or (d / "params.npz").exists())


@contextlib.contextmanager
def lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the checkpoint ``directory`` (a ``<name>.lock`` file beside it)
    for the ``with`` block, so that processes sharing a folder make each checkpoint once: a second
    process blocks, saying so on stderr, until the first has saved it. Advisory (``fcntl.flock``);
    where ``fcntl`` is missing (Windows) the block runs unlocked. Yields the lock file's path."""
    d = Path(directory).absolute()
    d.parent.mkdir(parents=True, exist_ok=True)
    path = d.parent / f"{d.name}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield path
        return
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish {d} ...", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_meta(directory: str | os.PathLike) -> dict:
    """The ``meta.json`` of a complete checkpoint (without reading its arrays)."""
    d = Path(directory).absolute()
    if not exists(d):
        raise QuarticError(f"no checkpoint at {d} (expected meta.json and params/)")
    return json.loads((d / "meta.json").read_text())


def save(directory: str | os.PathLike, params: Any, meta: dict) -> Path:
    """Write ``params`` (any pytree of arrays) and ``meta`` (JSON-able) to ``directory``."""
    d = Path(directory).absolute()
    d.mkdir(parents=True, exist_ok=True)
    (d / "meta.json").unlink(missing_ok=True)  # incomplete until the new meta lands
    flat = {k: np.asarray(v) for k, v in _flat(params).items()}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(d / "params", flat, force=True)
    tmp = d / "meta.tmp.json"
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, d / "meta.json")
    return d


def load(directory: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Read a checkpoint into the structure, shapes and dtypes of ``template``; ``(params, meta)``.

    Raises a :class:`~quartic.core.errors.QuarticError` naming the first parameter whose name or shape
    does not match (a checkpoint of another model).
    """
    d = Path(directory).absolute()
    meta = read_meta(d)
    expected = _flat(template)
    if (d / "params").is_dir():
        with ocp.StandardCheckpointer() as ckptr:
            stored_meta = ckptr.metadata(d / "params")
            tree = getattr(stored_meta, "item_metadata", stored_meta)
            names = set(tree.keys()) if hasattr(tree, "keys") else set(expected)
            _check(d, expected, {k: tuple(tree[k].shape) for k in names if k in expected}, names)
            target = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in expected.items()}
            stored = ckptr.restore(d / "params", target)
    else:
        with np.load(d / "params.npz") as npz:
            _check(d, expected, {k: npz[k].shape for k in npz.files}, set(npz.files))
            stored = {k: npz[k] for k in expected}
    leaves = [np.asarray(stored[k]).astype(np.asarray(v).dtype) for k, v in expected.items()]
    treedef = jax.tree_util.tree_structure(template)
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves]), meta


def _check(d: Path, expected: dict, shapes: dict, names: set) -> None:
    for name, x in expected.items():
        if name not in names:
            raise QuarticError(f"checkpoint {d} has no parameter {name!r}: another model's?")
        if tuple(shapes[name]) != tuple(np.shape(x)):
            raise QuarticError(
                f"checkpoint {d}: {name!r} has shape {tuple(shapes[name])}, the model expects "
                f"{tuple(np.shape(x))}"
            )
