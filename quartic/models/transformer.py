"""A small pre-LayerNorm transformer in flax nnx, with LoRA adapters and a pure functional view.

Architecture (GPT-2 style, sized from ~2k to ~1M parameters by :meth:`TransformerConfig.preset`)::

    x   = E[tokens] + P[:T]                                   [batch, seq, d_model]
    x  += Attn(LN(x))      (multi-head, causal mask when config.causal, PAD keys masked)
    x  += MLP(LN(x))       (d_model -> d_ff -> d_model, gelu)  ... n_layers times
    h   = LN(x)
    LM head          (n_classes=None): logits = h W + b         [batch, seq, vocab]
    classifier head  (n_classes=int):  logits = pool(h) W + b   [batch, n_classes]

Initialisation: embeddings ~ N(0, 1/d_model), kernels ~ N(0, 1/d_in) (the residual branches'
output projections also scaled by 1/sqrt(2 n_layers), as in GPT-2), biases 0, LayerNorm scales 1;
all draws are slices of one normal vector from ``rngs.params()`` (see ``_Init``).

Pooling for the classifier head (``config.pooling``): ``"mean"`` averages ``h`` over the non-PAD
positions (tokens != ``config.pad_id``); ``"max"`` takes each feature's maximum over them (a
linear head on it can say "some token has this feature", an OR over positions); ``"last"`` takes
``h`` at the last non-PAD position.

LoRA (``config.lora_rank = r > 0``): the query and value projections of every attention layer and
both MLP matrices get an adapter ``y = x W + b + (x A) B`` with ``A [d_in, r]`` random and
``B [r, d_out]`` zero, so at initialisation the adapted model computes exactly what the base model
computes. Adapters are stored as :class:`LoRAParam` (a subclass of ``nnx.Param``), so
``wrt=LoRAParam`` selects only them and ``wrt=BaseParam`` only the base weights.

The curvature code works on pure functions ``loss_fn(params, batch)``; :func:`functional` turns a
model into ``(apply_fn, params)`` with ``params`` a plain nested dict of arrays (so
``jax.flatten_util.ravel_pytree`` gives the flat ``theta``) and ``apply_fn`` pure, jit/vmap/jvp
compatible. :func:`merge_params` / :func:`update_params` write such a dict back into a model.

Everything is written with explicit broadcasting and dtypes taken from ``config.param_dtype``, so it
runs under ``jax_numpy_rank_promotion="raise"`` and ``jax_numpy_dtype_promotion="strict"`` in
float32 and float64.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quartic.core.errors import QuarticError, require_float64

__all__ = [
    "POOLINGS",
    "PRESETS",
    "BaseParam",
    "LoRAParam",
    "Transformer",
    "TransformerConfig",
    "count_params",
    "functional",
    "merge_params",
    "update_params",
]

PyTree = Any


class LoRAParam(nnx.Param):
    """A low-rank adapter matrix (``A`` or ``B``); filter with ``wrt=LoRAParam``."""


# Base weights only (every nnx.Param that is not a LoRA adapter).
BaseParam = nnx.All(nnx.Param, nnx.Not(LoRAParam))

# the classifier's read-outs (``TransformerConfig.pooling``); the one list every check uses
POOLINGS = ("mean", "max", "last")

# name -> (target parameter count, n_layers, n_heads, d_ff / d_model)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "2k": (2_000, 1, 2, 4),
    "7k": (7_000, 2, 2, 4),
    "30k": (30_000, 2, 4, 4),
    "100k": (100_000, 4, 4, 4),
    "1m": (1_000_000, 6, 8, 4),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`Transformer`.

    Attributes:
      vocab_size: number of token ids V.
      seq_len: maximum sequence length T (size of the learned positional table).
      d_model, n_heads, n_layers, d_ff: width, heads (must divide d_model), blocks, MLP width.
      causal: causal self-attention (a language model) or bidirectional (an encoder).
      n_classes: ``None`` for an LM head ``[B, T, V]``; an int for a pooled classifier ``[B, C]``.
      pooling: ``"mean"`` or ``"max"`` (over non-PAD positions, per feature) or ``"last"`` (last
        non-PAD position); only used with ``n_classes``.
      pad_id: the PAD token id; PAD keys are masked in attention and excluded from pooling.
      lora_rank: rank r of the LoRA adapters (0: none).
      param_dtype: ``"float32"`` or ``"float64"``; every parameter and activation has this dtype.
    """

    vocab_size: int
    seq_len: int
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int
    causal: bool = True
    n_classes: int | None = None
    pooling: str = "mean"
    pad_id: int = 0
    lora_rank: int = 0
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
            if int(getattr(self, name)) < 1:
                raise QuarticError(
                    f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if self.d_model % self.n_heads:
            raise QuarticError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                "choose d_model as a multiple of n_heads"
            )
        if self.n_classes is not None and self.n_classes < 2:
            raise QuarticError(f"n_classes must be None or >= 2, got {self.n_classes}")
        if self.pooling not in POOLINGS:
            raise QuarticError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.lora_rank < 0:
            raise QuarticError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.param_dtype not in ("float32", "float64"):
            raise QuarticError(
                f"param_dtype must be 'float32' or 'float64', got {self.param_dtype!r}"
            )

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerConfig:
        return cls(**d)

    @classmethod
    def preset(cls, name: str, *, vocab_size: int, seq_len: int, **overrides) -> TransformerConfig:
        """A config with about ``name`` base parameters (``"2k"``, ``"7k"``, ``"30k"``, ``"100k"``,
        ``"1m"``) for the given vocabulary and length.

        Depth, heads and ``d_ff = 4 d_model`` are fixed per preset; ``d_model`` (a multiple of
        ``n_heads``) is chosen to bring :func:`count_params` (without LoRA) closest to the target.
        ``overrides`` set any other field (``causal``, ``n_classes``, ``lora_rank``,
        ``param_dtype``, ...). Raises ``ValueError`` when no width lands within 30 % of the target
        (e.g. a vocabulary so large that the embeddings alone exceed it).
        """
        if name not in PRESETS:
            raise QuarticError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        target, n_layers, n_heads, ff_mult = PRESETS[name]
        fixed = {"n_layers": n_layers, "n_heads": n_heads}
        for key in ("n_layers", "n_heads"):
            if key in overrides:
                fixed[key] = overrides.pop(key)
        for key in ("d_model", "d_ff"):
            if key in overrides:
                raise QuarticError(
                    f"preset chooses {key}; build TransformerConfig directly instead"
                )
        best, best_err = None, math.inf
        h = fixed["n_heads"]
        for d in range(h, 2048 + 1, h):
            cfg = cls(
                vocab_size=vocab_size,
                seq_len=seq_len,
                d_model=d,
                d_ff=ff_mult * d,
                **fixed,
                **overrides,
            )
            err = abs(count_params(cfg, include_lora=False) - target) / target
            if err < best_err:
                best, best_err = cfg, err
        if best_err > 0.3:
            raise QuarticError(
                f"preset {name!r} cannot reach ~{target} parameters with vocab_size={vocab_size}, "
                f"seq_len={seq_len} (closest: {count_params(best, include_lora=False)}); "
                "use a larger preset or build TransformerConfig directly"
            )
        return best


def count_params(config: TransformerConfig, *, include_lora: bool = True) -> int:
    """Number of scalar parameters of ``Transformer(config)`` (closed form, no allocation)."""
    d, f, v, t, r = config.d_model, config.d_ff, config.vocab_size, config.seq_len, config.lora_rank
    embed = v * d + t * d
    attn = 4 * (d * d + d)
    mlp = d * f + f + f * d + d
    norms = 2 * 2 * d
    block = attn + mlp + norms
    out = config.n_classes if config.n_classes is not None else v
    head = 2 * d + d * out + out
    total = embed + config.n_layers * block + head
    if include_lora and r:
        # q, v: [d, r] + [r, d] each; MLP: [d, r] + [r, f] and [f, r] + [r, d].
        total += config.n_layers * (2 * (d * r + r * d) + (d * r + r * f) + (f * r + r * d))
    return total


class _Init:
    """Initial values: consecutive slices of one standard-normal vector per model.

    One PRNG program per model size instead of one per parameter shape: compiling those dominated
    the CPU time of building small models. Eagerly the slicing runs in numpy (no compilation);
    traced (``nnx.eval_shape``, ``nnx.jit``) it runs in JAX, with the same values.
    """

    def __init__(self, key: jax.Array, size: int, dtype):
        self.dtype = jnp.dtype(dtype)
        z = jax.random.normal(key, (size,), self.dtype)
        try:
            self._z = np.asarray(z)
        except jax.errors.TracerArrayConversionError:
            self._z = z
        self._next = 0

    def normal(self, shape: tuple[int, ...], std: float) -> jax.Array:
        n = math.prod(shape)
        if self._next + n > self._z.shape[0]:
            raise RuntimeError(
                "_Init ran out of draws: the size given at construction is too small"
            )
        x = self._z[self._next : self._next + n].reshape(shape) * std
        self._next += n
        return jnp.asarray(x, self.dtype)

    def const(self, shape: tuple[int, ...], value: float) -> jax.Array:
        return jnp.asarray(np.full(shape, value, self.dtype))


def _bcast_last(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape a ``[D]`` vector to ``[1, ..., 1, D]`` (explicit, for rank-promotion="raise")."""
    return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


class Dense(nnx.Module):
    """``y = x W + b`` over the last axis, with an optional LoRA adapter ``+ (x A) B``."""

    def __init__(
        self, d_in: int, d_out: int, *, init: _Init, lora_rank: int = 0, init_scale: float = 1.0
    ):
        self.kernel = nnx.Param(init.normal((d_in, d_out), init_scale / d_in**0.5))
        self.bias = nnx.Param(init.const((d_out,), 0.0))
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_a = LoRAParam(init.normal((d_in, lora_rank), 1 / d_in**0.5))
            self.lora_b = LoRAParam(init.const((lora_rank, d_out), 0.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.kernel[...]) + _bcast_last(self.bias[...], x.ndim)
        if self.lora_rank:
            xa = jnp.einsum("...i,ir->...r", x, self.lora_a[...])
            y = y + jnp.einsum("...r,ro->...o", xa, self.lora_b[...])
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with learned scale and offset."""

    def __init__(self, d: int, *, init: _Init, eps: float = 1e-5):
        self.scale = nnx.Param(init.const((d,), 1.0))
        self.bias = nnx.Param(init.const((d,), 0.0))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        y = (x - mu) * jax.lax.rsqrt(var + self.eps)
        return y * _bcast_last(self.scale[...], x.ndim) + _bcast_last(self.bias[...], x.ndim)


class Attention(nnx.Module):
    """Multi-head self-attention; LoRA on the query and value projections (``q_proj``, ``v_proj``).

    (The projections are not called ``query``/``value``: optax's L-BFGS looks up the key ``value``
    anywhere in its state, which holds a copy of the params.)
    """

    def __init__(self, config: TransformerConfig, *, init: _Init):
        d, r = config.d_model, config.lora_rank
        out_scale = 1 / (2 * config.n_layers) ** 0.5  # GPT-2: residual branches scaled by depth
        self.n_heads = config.n_heads
        self.causal = config.causal
        self.q_proj = Dense(d, d, init=init, lora_rank=r)
        self.k_proj = Dense(d, d, init=init)
        self.v_proj = Dense(d, d, init=init, lora_rank=r)
        self.o_proj = Dense(d, d, init=init, init_scale=out_scale)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: ``[B, T, D]``; key_mask: ``[B, T]`` bool (False = PAD key). Returns ``[B, T, D]``."""
        b, t, d = x.shape
        h = self.n_heads

        def heads(y):
            return jnp.reshape(y, (b, t, h, d // h))

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // h)
        allowed = jnp.reshape(key_mask, (b, 1, 1, t))
        if self.causal:
            allowed = allowed & jnp.reshape(jnp.tril(jnp.ones((t, t), bool)), (1, 1, t, t))
        # A finite floor, not -inf: a query whose keys are all masked gets a uniform row, not NaN.
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("bhqk,bkhe->bqhe", weights, v)
        return self.o_proj(jnp.reshape(y, (b, t, d)))


class MLP(nnx.Module):
    """``d_model -> d_ff -> d_model`` with gelu; LoRA on both matrices."""

    def __init__(self, config: TransformerConfig, *, init: _Init):
        d, f, r = config.d_model, config.d_ff, config.lora_rank
        out_scale = 1 / (2 * config.n_layers) ** 0.5
        self.fc_in = Dense(d, f, init=init, lora_rank=r)
        self.fc_out = Dense(f, d, init=init, lora_rank=r, init_scale=out_scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc_out(jax.nn.gelu(self.fc_in(x)))


class Block(nnx.Module):
    """Pre-LayerNorm residual block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``."""

    def __init__(self, config: TransformerConfig, *, init: _Init):
        self.ln_attn = LayerNorm(config.d_model, init=init)
        self.attn = Attention(config, init=init)
        self.ln_mlp = LayerNorm(config.d_model, init=init)
        self.mlp = MLP(config, init=init)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_attn(x), key_mask)
        return x + self.mlp(self.ln_mlp(x))


class Transformer(nnx.Module):
    """The model; see the module docstring. ``Transformer(config, rngs=nnx.Rngs(seed))``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if config.param_dtype == "float64":
            require_float64("a model with param_dtype='float64'")
        d = config.d_model
        self.config = config
        # Enough draws, rounded up to a power of two so that models of similar size share one
        # compiled PRNG program.
        init = _Init(rngs.params(), 1 << (count_params(config) - 1).bit_length(), config.dtype)
        self.token_embed = nnx.Param(init.normal((config.vocab_size, d), d**-0.5))
        self.pos_embed = nnx.Param(init.normal((config.seq_len, d), d**-0.5))
        self.blocks = nnx.List([Block(config, init=init) for _ in range(config.n_layers)])
        self.ln_final = LayerNorm(d, init=init)
        n_out = config.n_classes if config.n_classes is not None else config.vocab_size
        self.head = Dense(d, n_out, init=init)

    @property
    def embedding_matrix(self) -> jax.Array:
        """The token embedding table ``[vocab, d_model]``."""
        return self.token_embed[...]

    def padding_mask(self, tokens: jax.Array) -> jax.Array:
        """``[B, T]`` bool, True where ``tokens`` is not PAD."""
        return tokens != self.config.pad_id

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token + learned position embedding: int ``[B, T]`` -> ``[B, T, D]``."""
        self._check_tokens(tokens)
        t = tokens.shape[1]
        pos = jnp.reshape(self.pos_embed[...][:t], (1, t, self.config.d_model))
        return jnp.take(self.token_embed[...], tokens, axis=0) + pos

    def from_embeddings(self, x: jax.Array, tokens_mask: jax.Array | None = None) -> jax.Array:
        """Logits from input embeddings ``x [B, T, D]`` (differentiable in ``x``).

        ``tokens_mask [B, T]`` (bool or 0/1) marks the real tokens; ``None`` means all are real.
        ``from_embeddings(embed(t), padding_mask(t)) == __call__(t)``.
        Returns ``[B, T, V]`` (LM head) or ``[B, n_classes]`` (classifier head).
        """
        if x.ndim != 3 or x.shape[-1] != self.config.d_model:
            raise QuarticError(
                f"embeddings must be [batch, seq, {self.config.d_model}], got {x.shape}"
            )
        b, t, _ = x.shape
        if tokens_mask is None:
            mask = jnp.ones((b, t), bool)
        else:
            if tokens_mask.shape != (b, t):
                raise QuarticError(f"tokens_mask must be [{b}, {t}], got {tokens_mask.shape}")
            mask = tokens_mask.astype(bool)
        h = self._hidden(x, mask)
        if self.config.n_classes is None:
            return self.head(h)
        return self.head(self._pool(h, mask))

    def _hidden(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """The final hidden states ``h [B, T, D]``: the blocks and the last LayerNorm."""
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_final(x)

    def _pool(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        """The classifier's read-out ``[B, D]`` of the final hidden states ``h [B, T, D]``."""
        b, t, _ = h.shape
        m = mask.astype(h.dtype)
        if self.config.pooling == "mean":
            denom = jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1.0)
            return jnp.sum(h * jnp.reshape(m, (b, t, 1)), axis=1) / denom
        if self.config.pooling == "max":  # over the real tokens; 0 if the row is all PAD
            real = jnp.reshape(mask, (b, t, 1))
            top = jnp.max(jnp.where(real, h, jnp.finfo(h.dtype).min), axis=1)
            return jnp.where(jnp.any(mask, axis=1, keepdims=True), top, jnp.zeros_like(top))
        # "last": the last non-PAD position (position 0 if the row is all PAD)
        last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)
        return jnp.take_along_axis(h, jnp.reshape(last, (b, 1, 1)), axis=1)[:, 0, :]

    def features(self, tokens: jax.Array) -> jax.Array:
        """The classifier head's input: pooled final hidden states ``[B, D]`` of int ``tokens
        [B, T]``, so that ``head(features(t)) == __call__(t)``. Classifier configs only."""
        if self.config.n_classes is None:
            raise QuarticError("features: the model has an LM head (n_classes=None), no pooling")
        mask = self.padding_mask(tokens)
        return self._pool(self._hidden(self.embed(tokens), mask), mask)

    def layer_features(self, tokens: jax.Array) -> jax.Array:
        """The pooled states at every depth, for layer-wise linear probes: ``[n_layers + 2, B, D]``
        of int ``tokens [B, T]``: the embeddings, each block's output, and the last LayerNorm's
        (``layer_features(t)[-1] == features(t)``). Pooled as the classifier pools (``config.
        pooling``); any head."""
        mask = self.padding_mask(tokens)
        x = self.embed(tokens)
        states = [x]
        for block in self.blocks:
            x = block(x, mask)
            states.append(x)
        states.append(self.ln_final(x))
        return jnp.stack([self._pool(h, mask) for h in states])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int tokens ``[B, T]`` -> logits ``[B, T, V]`` (LM) or ``[B, n_classes]`` (classifier)."""
        return self.from_embeddings(self.embed(tokens), self.padding_mask(tokens))

    def _check_tokens(self, tokens: jax.Array) -> None:
        if tokens.ndim != 2:
            raise QuarticError(f"tokens must be int [batch, seq], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise QuarticError(f"tokens must be integers, got {tokens.dtype}")
        if tokens.shape[1] > self.config.seq_len:
            raise QuarticError(
                f"sequence length {tokens.shape[1]} exceeds config.seq_len={self.config.seq_len}"
            )


def functional(
    model: nnx.Module, wrt: Any = nnx.Param, method: str = "__call__"
) -> tuple[Callable[..., jax.Array], dict]:
    """A pure view of ``model``: ``(apply_fn, params)``.

    Args:
      model: an nnx module (not modified).
      wrt: an nnx filter selecting the variables that become ``params``: ``nnx.Param`` (all
        weights, adapters included), ``BaseParam`` (base weights only), ``LoRAParam`` (adapters
        only). The other variables are closed over as constants.
      method: the model method ``apply_fn`` calls (``"__call__"``, ``"from_embeddings"``, ...).

    Returns:
      ``apply_fn(params, *args, **kwargs) = getattr(model_with(params), method)(*args, **kwargs)``,
      pure and jit/vmap/jvp/grad compatible; and ``params``, a plain nested dict of arrays (module
      attribute names as keys, layer indices as int keys).
    """
    graphdef, state, rest = nnx.split(model, wrt, ...)
    params = nnx.to_pure_dict(state)
    if not jax.tree.leaves(params):
        raise QuarticError(f"the filter {wrt!r} selects no parameter of this model")

    def apply_fn(params: dict, *args, **kwargs):
        m = nnx.merge(graphdef, params, rest, copy=True)
        return getattr(m, method)(*args, **kwargs)

    return apply_fn, params


def update_params(model: nnx.Module, params: dict, wrt: Any = nnx.Param) -> None:
    """Write a nested dict from :func:`functional` back into ``model`` (in place)."""
    state = nnx.state(model, wrt)
    expected = jax.tree.structure(nnx.to_pure_dict(state))
    if jax.tree.structure(params) != expected:
        raise QuarticError(
            "params do not have the structure of the model's selected variables; "
            "were they made by functional(model, wrt) with the same wrt and config?"
        )
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def merge_params(model: nnx.Module, params: dict, wrt: Any = nnx.Param) -> nnx.Module:
    """A copy of ``model`` with the selected variables replaced by ``params`` (model unchanged)."""
    new = nnx.clone(model)
    update_params(new, params, wrt)
    return new
