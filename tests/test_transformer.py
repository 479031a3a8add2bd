"""The transformer: shapes, causality, padding, LoRA, the functional view, presets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from quartic.core.errors import QuarticError
from quartic.models import (
    PRESETS,
    BaseParam,
    LoRAParam,
    Transformer,
    TransformerConfig,
    count_params,
    functional,
    merge_params,
    update_params,
)

V, T = 23, 10


def config(**kw):
    base = dict(vocab_size=V, seq_len=T, d_model=8, n_heads=2, n_layers=2, d_ff=16)
    base.update(param_dtype="float64")
    base.update(kw)
    return TransformerConfig(**base)


# Few configs, shared shapes: every new parameter shape costs a PRNG compile at init.
LM = config()
LM_LORA = config(lora_rank=2)
ENCODER = config(causal=False, n_classes=3)


@functools.cache
def _built(cfg, seed):
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def make(cfg, seed=0):
    """A fresh copy of ``Transformer(cfg, rngs=nnx.Rngs(seed))`` (built once per process)."""
    return nnx.clone(_built(cfg, seed))


def tokens(batch=3, length=T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, V, size=(batch, length)), jnp.int32)


def n_leaves(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


# Jitted calls: eager op-by-op dispatch compiles every primitive and is slow to test with.
@nnx.jit
def run(model, x):
    return model(x)


@nnx.jit
def run_through_embeddings(model, x):
    return model.from_embeddings(model.embed(x), model.padding_mask(x))


@pytest.mark.parametrize(
    "cfg, shape",
    [
        (LM, (3, T, V)),
        (LM_LORA, (3, T, V)),
        (ENCODER, (3, 3)),
        (config(causal=False, n_classes=3, pooling="last"), (3, 3)),
        (config(param_dtype="float32"), (3, T, V)),
    ],
    ids=["lm", "lm-lora", "encoder-mean", "encoder-last", "lm-float32"],
)
def test_shapes_dtypes_and_param_count(cfg, shape):
    model = make(cfg)
    out = run(model, tokens())
    assert out.shape == shape
    assert out.dtype == cfg.dtype
    assert bool(jnp.all(jnp.isfinite(out)))
    _, params = functional(model)
    assert n_leaves(params) == count_params(cfg)
    assert all(x.dtype == cfg.dtype for x in jax.tree.leaves(params))


def test_causal_mask_hides_the_future():
    model = make(LM)
    x = tokens(batch=2)
    k = 6
    y = x.at[:, k].set((x[:, k] + 1) % V)
    a, b = run(model, x), run(model, y)
    np.testing.assert_array_equal(np.asarray(a[:, :k]), np.asarray(b[:, :k]))
    assert float(jnp.min(jnp.max(jnp.abs(a[:, k:] - b[:, k:]), axis=-1))) > 1e-6


def test_encoder_sees_the_future():
    model = make(config(causal=False))
    x = tokens(batch=2)
    y = x.at[:, -1].set((x[:, -1] + 1) % V)
    assert float(jnp.max(jnp.abs(run(model, x)[:, 0] - run(model, y)[:, 0]))) > 1e-6


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_classifier_ignores_padding(pooling):
    model = make(config(causal=False, n_classes=3, pooling=pooling))
    x = tokens(batch=4, length=6)
    padded = jnp.concatenate([x, jnp.zeros((4, 4), jnp.int32)], axis=1)
    np.testing.assert_allclose(
        np.asarray(run(model, padded)), np.asarray(run(model, x)), atol=1e-12
    )
    # ... while a real token in those positions does change the answer.
    filled = padded.at[:, 6].set(5)
    assert float(jnp.max(jnp.abs(run(model, filled) - run(model, x)))) > 1e-6


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_head_of_features_is_the_classifier(pooling):
    """``features`` is the head's input: ``head(features(t)) == model(t)`` with PAD in the rows
    (float64, one program each: rounding only); an LM has no pooled features."""
    model = make(config(causal=False, n_classes=3, pooling=pooling))
    x = tokens(batch=3, length=6).at[1, -2:].set(0)
    z = model.features(x)
    assert z.shape == (3, 8)
    np.testing.assert_allclose(np.asarray(model.head(z)), np.asarray(run(model, x)), atol=1e-12)
    with pytest.raises(QuarticError, match="LM head"):
        make(LM).features(x)


def test_max_pooling_takes_each_features_maximum_over_the_real_tokens():
    """``pooling="max"``: per feature, the largest final hidden state over the non-PAD positions
    (float64, exact: a maximum rounds nothing); a row of PAD only pools to 0; gradients flow only
    to the positions that hold a maximum."""
    model = make(config(causal=False, n_classes=3, pooling="max"))
    x = tokens(batch=3, length=6).at[1, -2:].set(0).at[2, :].set(0)
    mask = x != 0
    h = np.asarray(model._hidden(model.embed(x), mask))
    z = np.asarray(model.features(x))
    np.testing.assert_array_equal(z[0], h[0].max(0))
    np.testing.assert_array_equal(z[1], h[1, :4].max(0))
    np.testing.assert_array_equal(z[2], np.zeros(8))
    g = jax.grad(lambda hh: jnp.sum(model._pool(hh, mask)[:2, 0]))(jnp.asarray(h))
    g = np.asarray(g)
    assert g[0, :, 0].sum() == 1.0 and g[0, np.argmax(h[0, :, 0]), 0] == 1.0
    assert np.all(g[1, 4:] == 0) and np.all(np.isfinite(g)) and np.all(g[2] == 0)


def test_layer_features_are_the_pooled_states_at_each_depth():
    """``layer_features``: the embeddings pooled over the real tokens first, the head's input
    last, each block's output between (float64, rounding only); an LM has them too."""
    model = make(config(causal=False, n_classes=3, pooling="mean"))
    x = tokens(batch=3, length=6).at[1, -2:].set(0)
    z = model.layer_features(x)
    assert z.shape == (model.config.n_layers + 2, 3, 8)
    np.testing.assert_allclose(np.asarray(z[-1]), np.asarray(model.features(x)), atol=1e-12)
    m = np.asarray(x != 0, float)[..., None]
    emb = np.asarray(model.embed(x))
    np.testing.assert_allclose(np.asarray(z[0]), (emb * m).sum(1) / m.sum(1), atol=1e-12)
    h = model.embed(x)
    for i, block in enumerate(model.blocks):
        h = block(h, x != 0)
        np.testing.assert_allclose(
            np.asarray(z[i + 1]), (np.asarray(h) * m).sum(1) / m.sum(1), atol=1e-12
        )
    assert make(LM).layer_features(x).shape == z.shape


@pytest.mark.parametrize("cfg", [LM, ENCODER], ids=["lm", "encoder"])
def test_embed_then_from_embeddings_is_call(cfg):
    model = make(cfg)
    x = tokens().at[:, -2:].set(0)  # some PAD
    out = run_through_embeddings(model, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(run(model, x)), atol=1e-12)
    assert model.embedding_matrix.shape == (V, 8)
    emb = model.embed(x)
    np.testing.assert_allclose(
        np.asarray(emb[:, 0] - model.pos_embed[...][None, 0]),
        np.asarray(model.embedding_matrix[x[:, 0]]),
        atol=1e-12,
    )


def test_gradient_with_respect_to_input_embeddings():
    model = make(ENCODER)
    apply_fn, params = functional(model, method="from_embeddings")
    x = tokens()
    emb = model.embed(x)
    g = jax.jit(jax.grad(lambda e: apply_fn(params, e)[:, 1].sum()))(emb)
    assert g.shape == emb.shape
    assert float(jnp.linalg.norm(g)) > 1e-6


def test_lora_starts_as_the_base_model_and_is_selected_alone():
    cfg = LM_LORA
    lora_model = make(cfg)
    plain = make(LM, seed=1)
    _, base = functional(lora_model, BaseParam)
    update_params(plain, base)  # same base weights, no adapters
    x = tokens()
    np.testing.assert_array_equal(np.asarray(run(lora_model, x)), np.asarray(run(plain, x)))

    apply_fn, lora = functional(lora_model, LoRAParam)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lora)[0]]
    assert paths and all(p.endswith(("['lora_a']", "['lora_b']")) for p in paths)
    # q, v projections and both MLP matrices in every layer carry one (A, B) pair.
    assert len(paths) == 2 * 4 * cfg.n_layers
    assert n_leaves(lora) == count_params(cfg) - count_params(LM)
    assert not any(
        "lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]
    )

    # B = 0: the adapter output is 0, so d/dA = 0 while d/dB is not.
    def loss(p):
        return jnp.sum(jnp.square(apply_fn(p, x)))

    g = jax.jit(jax.grad(loss))(lora)
    blk = g["blocks"][0]["attn"]["q_proj"]
    assert float(jnp.max(jnp.abs(blk["lora_a"]))) == 0.0
    assert float(jnp.max(jnp.abs(blk["lora_b"]))) > 0.0
    # Moving B changes the output: the adapters are live.
    moved = jax.tree.map(lambda a, d: a - 0.1 * d, lora, g)
    assert float(jnp.max(jnp.abs(jax.jit(apply_fn)(moved, x) - run(lora_model, x)))) > 1e-6


def test_functional_view_is_pure_and_transformable():
    model = make(LM_LORA)
    apply_fn, params = functional(model)
    x = tokens()
    reference = np.asarray(run(model, x))
    np.testing.assert_allclose(np.asarray(jax.jit(apply_fn)(params, x)), reference, atol=1e-12)
    theta, unravel = ravel_pytree(params)
    assert theta.shape == (count_params(model.config),)

    # jvp against a central difference taken under vmap (one compiled function for both; a
    # difference of two plain calls compiles ~2x slower on CPU).
    f = lambda th: apply_fn(unravel(th), x)
    v = jnp.asarray(np.random.default_rng(0).standard_normal(theta.shape), theta.dtype)
    eps = 1e-6

    @jax.jit
    def jvp_and_vmap(th, v):
        _, tangent = jax.jvp(f, (th,), (v,))
        return tangent, jax.vmap(f)(jnp.stack([th + eps * v, th - eps * v]))

    tangent, (plus, minus) = jvp_and_vmap(theta, v)
    fd = (plus - minus) / (2 * eps)
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray((plus + minus) / 2), reference, atol=1e-9)
    assert float(jnp.max(jnp.abs(tangent))) > 1e-3

    # merge_params copies, update_params writes in place; apply_fn never touches the model.
    new = jax.jit(lambda th, v: unravel(th + 0.01 * v))(theta, v)
    moved = np.asarray(jax.jit(apply_fn)(new, x))
    assert np.max(np.abs(moved - reference)) > 1e-6
    other = merge_params(model, new)
    np.testing.assert_array_equal(np.asarray(run(model, x)), reference)
    np.testing.assert_allclose(np.asarray(run(other, x)), moved, atol=1e-12)
    update_params(model, new)
    np.testing.assert_allclose(np.asarray(run(model, x)), moved, atol=1e-12)
    with pytest.raises(ValueError, match="structure"):
        update_params(model, {"token_embed": params["token_embed"]})


def test_functional_with_base_filter_closes_over_the_rest():
    model = make(LM_LORA)
    apply_fn, base = functional(model, BaseParam)
    x = tokens()
    out = jax.jit(apply_fn)(base, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(run(model, x)), atol=1e-12)
    assert n_leaves(base) == count_params(model.config, include_lora=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("vocab, seq", [(34, 12), (64, 16)])
def test_presets_hit_their_targets(name, vocab, seq):
    cfg = TransformerConfig.preset(name, vocab_size=vocab, seq_len=seq, param_dtype="float64")
    target = PRESETS[name][0]
    n = count_params(cfg)
    assert abs(n - target) / target < 0.3, (name, n)
    assert cfg.d_model % cfg.n_heads == 0


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_preset_count_matches_a_real_model(lora_rank):
    cfg = TransformerConfig.preset(
        "7k", vocab_size=34, seq_len=12, param_dtype="float64", lora_rank=lora_rank
    )
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # shapes only
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))]
    assert sum(sizes) == count_params(cfg)


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="divisible"):
        config(d_model=9)
    with pytest.raises(ValueError, match="unknown preset"):
        TransformerConfig.preset("3k", vocab_size=V, seq_len=T)
    with pytest.raises(ValueError, match="cannot reach"):
        TransformerConfig.preset("2k", vocab_size=5000, seq_len=T)
    model = make(LM)
    with pytest.raises(ValueError, match="exceeds"):
        run(model, tokens(length=T + 1))
    with pytest.raises(ValueError, match="no parameter"):
        functional(model, LoRAParam)
