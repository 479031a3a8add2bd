"""The transfer study's models: one size in one of two architectures, their parameters as plain
nested dicts, a pretrained body carried into a classifier, LoRA folded back in, and stacks of
``M`` models written to and read from :mod:`quartic.harness.checkpoint` directories.

Parameters are the plain nested dicts of :func:`~quartic.models.transformer.functional`; a stack
of ``M`` models is the same dict with a leading ``[M]`` axis on every leaf.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quartic.core.cache import memo
from quartic.core.errors import QuarticError
from quartic.core.pytree import path_name
from quartic.harness import checkpoint
from quartic.models.transformer import (
    POOLINGS,
    PRESETS,
    Transformer,
    TransformerConfig,
    count_params,
    functional,
)

__all__ = [
    "ARCHS",
    "carry_body",
    "init_params",
    "load_params",
    "merge_lora",
    "model_config",
    "n_trainable",
    "save_params",
    "stack",
    "unstack",
]

#: Architecture -> the TransformerConfig fields that make it.
ARCHS: dict[str, dict[str, Any]] = {
    "decoder": {"causal": True, "pooling": "last"},
    "encoder": {"causal": False, "pooling": "mean"},
}


def model_config(
    size: str,
    arch: str,
    *,
    vocab_size: int,
    seq_len: int,
    head: str = "classifier",
    lora_rank: int = 0,
    pooling: str | None = None,
) -> TransformerConfig:
    """The config of a ``size`` (a preset name) model of architecture ``arch``.

    The width is chosen by :meth:`TransformerConfig.preset` for the 2-way classifier without
    adapters, so the language model (``head="lm"``) and the LoRA variant share its body exactly.
    ``pooling`` (``"mean"``, ``"max"`` or ``"last"``) replaces the architecture's own read-out of the
    classifier (:data:`ARCHS`); it has no weights, so every read-out shares the pretrained body,
    and the language model ignores it. Raises ``QuarticError`` for an unknown size, architecture,
    head or pooling.
    """
    if size not in PRESETS:
        raise QuarticError(f"unknown model size {size!r}; choose from {list(PRESETS)}")
    if arch not in ARCHS:
        raise QuarticError(f"unknown architecture {arch!r}; choose from {list(ARCHS)}")
    if head not in ("classifier", "lm"):
        raise QuarticError(f"head must be 'classifier' or 'lm', got {head!r}")
    if lora_rank < 0:
        raise QuarticError(f"lora_rank={lora_rank}: must be >= 0")
    if pooling is not None and pooling not in POOLINGS:
        raise QuarticError(f"pooling must be one of {POOLINGS} or None, got {pooling!r}")
    try:
        base = TransformerConfig.preset(
            size, vocab_size=vocab_size, seq_len=seq_len, n_classes=2, **ARCHS[arch]
        )
    except ValueError as e:
        raise QuarticError(f"model size {size!r} does not fit this language: {e}") from e
    if head == "lm":
        return dataclasses.replace(base, n_classes=None, lora_rank=lora_rank)
    return dataclasses.replace(base, lora_rank=lora_rank, pooling=pooling or base.pooling)


class _ModelFns(NamedTuple):
    call: Any  # (params, tokens[B, T]) -> logits
    embed: Any  # (params, tokens[B, T]) -> [B, T, D]
    from_embeddings: Any  # (params, emb[B, T, D], mask[B, T]) -> logits
    features: Any  # (params, tokens[B, T]) -> the head's input [B, D] (classifiers only)
    head: Any  # (params, features[B, D]) -> logits
    treedef: Any
    names: tuple[str, ...]


@memo(maxsize=64)
def _model_fns(cfg: TransformerConfig) -> _ModelFns:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    call, params = functional(model)
    embed, _ = functional(model, method="embed")
    from_emb, _ = functional(model, method="from_embeddings")
    features, _ = functional(model, method="features")
    head, _ = functional(model, method="head")
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = tuple(path_name(p) for p, _ in paths)
    return _ModelFns(call, embed, from_emb, features, head, treedef, names)


def n_trainable(cfg: TransformerConfig, ft: str) -> int:
    """Parameters that fine-tuning moves: all of them (``ft="full"``), or the LoRA adapters of
    every attention and MLP kernel and the classifier head (``ft="lora"``)."""
    if ft == "full":
        return count_params(cfg)
    d, f, r, L = cfg.d_model, cfg.d_ff, cfg.lora_rank, cfg.n_layers
    head = d * cfg.n_classes + cfg.n_classes
    return L * (2 * (d * r + r * d) + (d * r + r * f) + (f * r + r * d)) + head


def init_params(cfg: TransformerConfig, seed: int) -> dict:
    """Fresh parameters of ``Transformer(cfg)`` (a nested dict of numpy-backed arrays)."""
    return functional(Transformer(cfg, rngs=nnx.Rngs(seed)))[1]


def carry_body(classifier: dict, pretrained: dict, skip: tuple[str, ...] = ("head",)) -> dict:
    """``classifier`` with every weight that ``pretrained`` also has (same path) replaced by the
    pretrained one, except the top-level ``skip`` entries (the head). Adapters, which the
    pretrained model lacks, keep their initial values. Raises ``QuarticError`` when a shared weight
    has another shape (the bodies differ)."""

    def merge(c, p, path):
        out = {}
        for k, v in c.items():
            here = f"{path}/{k}" if path else str(k)
            if (not path and k in skip) or k not in p:
                out[k] = v
            elif isinstance(v, dict):
                out[k] = merge(v, p[k], here)
            else:
                if np.shape(v) != np.shape(p[k]):
                    raise QuarticError(
                        f"cannot carry {here}: the classifier has shape {np.shape(v)}, the "
                        f"pretrained model {np.shape(p[k])}; the two bodies must match"
                    )
                out[k] = p[k]
        return out

    return merge(classifier, pretrained, "")


def merge_lora(params: dict) -> dict:
    """Fold every LoRA adapter into its kernel (``W + A B``) and drop the adapters: the result is
    the parameter dict of the same config with ``lora_rank=0`` and computes the same function."""
    if not isinstance(params, dict):
        return params
    if "lora_a" in params and "lora_b" in params:
        out = {k: v for k, v in params.items() if k not in ("lora_a", "lora_b")}
        out["kernel"] = params["kernel"] + jnp.einsum(
            "...ir,...ro->...io", params["lora_a"], params["lora_b"]
        )
        return out
    return {k: merge_lora(v) for k, v in params.items()}


def stack(params_list: list[dict]) -> dict:
    """``M`` parameter dicts -> one dict with a leading ``[M]`` axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def unstack(stacked: dict) -> list[dict]:
    """Inverse of :func:`stack` (numpy leaves)."""
    leaves, treedef = jax.tree.flatten(stacked)
    m = leaves[0].shape[0]
    return [treedef.unflatten([np.asarray(x[i]) for x in leaves]) for i in range(m)]


def save_params(
    directory: str | os.PathLike, cfg: TransformerConfig, params: dict, info: dict | None = None
) -> pathlib.Path:
    """Write ``params`` of ``cfg`` (one model, or a stack of ``M`` with a leading ``[M]`` axis) and
    ``info`` (JSON-able) as a :mod:`quartic.harness.checkpoint` directory (orbax arrays + ``meta.json``,
    atomic: a directory with ``meta.json`` is complete)."""
    fns = _model_fns(cfg)
    leaves = jax.tree.leaves(params)
    if len(leaves) != len(fns.names):
        raise QuarticError(f"params do not match the model config {cfg} (leaf count differs)")
    template = jax.tree.leaves(_template(cfg))
    extra = {np.ndim(x) - np.ndim(t) for x, t in zip(leaves, template, strict=True)}
    if extra not in ({0}, {1}):
        raise QuarticError(f"params are neither one model of {cfg} nor a stack of them")
    stacked = int(np.shape(leaves[0])[0]) if extra == {1} else None
    meta = {"model_config": dataclasses.asdict(cfg), "stacked": stacked, "info": info or {}}
    return checkpoint.save(directory, params, meta)


def load_params(directory: str | os.PathLike, cfg: TransformerConfig) -> tuple[dict, dict]:
    """``(params, info)`` written by :func:`save_params` for ``cfg`` (a stack stays stacked).

    Raises a :class:`~quartic.core.errors.QuarticError` when the directory holds no checkpoint or one
    written for another model config."""
    if not checkpoint.exists(directory):
        raise QuarticError(f"no checkpoint at {directory}")
    meta = checkpoint.read_meta(directory)
    if meta.get("model_config") != dataclasses.asdict(cfg):
        raise QuarticError(f"{directory} was written for another model config")
    template = _template(cfg)
    if meta["stacked"] is not None:
        m = meta["stacked"]
        template = jax.tree.map(lambda x: np.broadcast_to(x, (m, *np.shape(x))), template)
    params, meta = checkpoint.load(directory, template)
    return params, meta["info"]


@memo(maxsize=64)
def _template(cfg: TransformerConfig) -> dict:
    return jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), init_params(cfg, 0))
