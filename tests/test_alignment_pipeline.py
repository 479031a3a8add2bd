"""Training loops and the aligned model theta*: compile-once, divergence, L-BFGS, acceptance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from quartic.core import train as training_module
from quartic.core.errors import QuarticError
from quartic.core.train import TrainingDivergedError, minimize_full_batch, train
from quartic.models import LoRAParam, Transformer, TransformerConfig, count_params, functional
from quartic.studies import collapse
from quartic.studies.training import (
    AlignConfig,
    checkpoint_key,
    load_theta_star,
    make_aligned_model,
    save_theta_star,
)
from quartic.tasks import token_world as tw


def regression(n=64, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    return {"x": jnp.asarray(x), "y": jnp.asarray(x @ w_true)}, w_true


def test_train_compiles_once_and_learns():
    data, w_true = regression()
    traces = []

    def loss_fn(params, batch):
        traces.append(1)  # runs only while tracing
        return jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))

    opt = optax.adam(0.05)
    params = {"w": jnp.zeros(5)}
    res = train(
        loss_fn,
        params,
        data,
        opt,
        n_steps=250,
        key=jax.random.key(0),
        batch_size=16,
        chunk_size=100,
        progress=False,
    )
    assert res.losses.shape == (250,)  # 3 chunks, the last one partly idle
    assert len(traces) == 1
    res2 = train(
        loss_fn,
        res.params,
        data,
        opt,
        n_steps=150,
        key=jax.random.key(1),
        batch_size=16,
        chunk_size=100,
        opt_state=res.opt_state,
        progress=False,
    )
    assert len(traces) == 1  # the same step function serves the second call
    assert res2.losses[-1] < 1e-3 * res.losses[0]
    np.testing.assert_allclose(np.asarray(res2.params["w"]), w_true, atol=1e-2)


def test_train_samples_named_datasets_separately():
    a, _ = regression(n=40, seed=1)
    b, _ = regression(n=7, seed=2)

    def loss_fn(params, batch):
        assert batch["a"]["x"].shape == (8, 5) and batch["b"]["x"].shape == (3, 5)
        return sum(jnp.mean(jnp.square(batch[k]["x"] @ params - batch[k]["y"])) for k in "ab")

    res = train(
        loss_fn,
        jnp.zeros(5),
        {"a": a, "b": b},
        optax.sgd(0.01),
        n_steps=20,
        key=jax.random.key(0),
        batch_size={"a": 8, "b": 3},
        progress=False,
    )
    assert res.losses[-1] < res.losses[0]


def test_bad_arguments_raise_quartic_errors():
    a, _ = regression(n=8, seed=1)
    kw = dict(key=jax.random.key(0), progress=False)

    def loss(p, b):
        return jnp.mean(jnp.square(b["x"] @ p - b["y"]))

    with pytest.raises(QuarticError, match="n_steps >= 0"):
        train(loss, jnp.zeros(5), a, optax.sgd(0.1), n_steps=-1, **kw)
    with pytest.raises(QuarticError, match=r"names datasets \['c'\]"):
        train(loss, jnp.zeros(5), {"a": a}, optax.sgd(0.1), n_steps=1, batch_size={"c": 2}, **kw)
    with jax.enable_x64(False), pytest.raises(QuarticError, match="enable it first"):
        collapse.aligned_setup()  # library code never turns float64 on for its caller


def test_donated_training_state_is_aliased_and_changes_nothing():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4), jnp.float64)
    data = {"x": x, "y": jnp.sin(x[:, 0])}

    def loss_fn(params, batch):
        return jnp.mean((jnp.tanh(batch["x"] @ params["w"]) @ params["v"] - batch["y"]) ** 2)

    params = {"w": 0.3 * jnp.ones((4, 6)), "v": 0.1 * jnp.ones((6,))}
    opt = optax.adam(1e-2)
    kw = dict(n_steps=25, key=jax.random.key(1), batch_size=16, chunk_size=10, progress=False)
    donated = train(loss_fn, params, data, opt, donate=True, **kw)
    kept = train(loss_fn, params, data, opt, donate=False, **kw)
    # the caller's arrays survive; donation changes no number
    assert not params["w"].is_deleted()
    np.testing.assert_array_equal(donated.losses, kept.losses)
    for a, b in zip(jax.tree.leaves(donated.params), jax.tree.leaves(kept.params), strict=True):
        np.testing.assert_array_equal(a, b)
    # the compiled chunk writes the whole state (params + Adam moments + count) into its inputs
    state = (params, opt.init(params))
    run = training_module._minibatch_chunk(loss_fn, opt, 16, 10, True)
    mem = run.lower(*state, data, jax.random.key(0), 10).compile().memory_analysis()
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert mem.alias_size_in_bytes == state_bytes


def test_divergence_raises_and_keeps_the_last_finite_state():
    loss_fn = lambda w, batch: jnp.sum(jnp.square(w))
    # SGD with lr 10 on sum(w^2) multiplies w by -19 per step; the loss 3 * 19^(2k) overflows
    # float64 at step k = 121.
    with pytest.raises(TrainingDivergedError, match="non-finite") as info:
        train(
            loss_fn,
            jnp.ones(3),
            {"x": jnp.zeros((4, 1))},
            optax.sgd(10.0),
            n_steps=1000,
            key=jax.random.key(0),
            batch_size=2,
            chunk_size=100,
            progress=False,
        )
    err = info.value
    assert err.step == 121
    assert err.losses.shape == (err.step,) and np.all(np.isfinite(err.losses))
    assert np.all(np.isfinite(np.asarray(err.params)))
    np.testing.assert_allclose(np.abs(np.asarray(err.params)), 19.0**err.step, rtol=1e-9)
    assert err.partial["step"] == err.step


def test_lbfgs_matches_least_squares():
    data, _ = regression(n=50, d=8, seed=3)
    loss_fn = lambda p, d: 0.5 * jnp.mean(jnp.square(d["x"] @ p["w"] - d["y"] + 0.3))
    res = minimize_full_batch(loss_fn, {"w": jnp.zeros(8)}, data, gtol=1e-12, progress=False)
    assert res.converged and res.grad_norms[-1] <= 1e-12
    exact = np.linalg.lstsq(np.asarray(data["x"]), np.asarray(data["y"]) - 0.3, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(res.params["w"]), exact, atol=1e-9)
    assert res.losses.shape == res.grad_norms.shape
    assert res.losses.size < 60


# ----- theta*: the transformer study's acceptance numbers -----

WORLD = tw.WorldConfig(seed=0)
MODEL = TransformerConfig.preset("7k", vocab_size=34, seq_len=12, param_dtype="float64")


@pytest.fixture(scope="module")
def aligned(theta_star_cache):
    """The 7k θ*, from the session's cache (the scaling tests' 7k model is the same one)."""
    world = tw.TokenWorld(WORLD)
    result = make_aligned_model(MODEL, world, seed=0, cache_dir=theta_star_cache, progress=False)
    return world, result, theta_star_cache


@pytest.mark.slow
def test_pretrained_model_complies(aligned):
    _, result, _ = aligned
    before = result.report["before"]
    assert before["harmfulness_heldout"] == 1.0 and before["harmfulness_train"] == 1.0
    assert before["comply_accuracy_heldout"] > 0.8  # it answers harmful prompts by their rule
    assert before["align_loss"] > 5.0


@pytest.mark.slow
def test_theta_star_is_aligned_at_a_stationary_point(aligned):
    world, result, _ = aligned
    report = result.report
    assert count_params(MODEL) == report["n_params"] == 6250
    # Recomputed here, not read from the report: ||grad L_A(theta*)|| relative to the pretrained,
    # and the greedy answers to the train and held-out harmful prompts (one forward pass).
    skill, held_out = world.skill(None, "train"), world.skill(None, "heldout")

    @jax.jit
    def measure(theta, skill, held_out):
        def align_loss(p):
            logits_train, logits_held_out = tw.joint_logits(result.apply_fn, p, skill, held_out)
            greedy = [
                jnp.argmax(tw.answer_logits_from_logits(z, b), axis=-1)
                for z, b in ((logits_train, skill), (logits_held_out, held_out))
            ]
            return tw.refusal_loss_from_logits(logits_train, skill), greedy

        grad, (greedy_train, greedy_held_out) = jax.grad(align_loss, has_aux=True)(theta)
        return jnp.linalg.norm(ravel_pytree(grad)[0]), greedy_train, greedy_held_out

    grad_norm, greedy_train, greedy_held_out = measure(result.theta_star, skill, held_out)
    ratio = float(grad_norm) / report["before"]["align_grad_norm"]
    assert ratio < 1e-4, ratio
    np.testing.assert_allclose(ratio, report["grad_ratio"], rtol=1e-6)
    assert report["polish_converged"]
    assert np.all(np.asarray(greedy_held_out) == tw.REFUSE)  # harmfulness rate 0, held out
    assert np.all(np.asarray(greedy_train) == tw.REFUSE)


@pytest.mark.slow
def test_benign_answers_are_kept(aligned):
    _, result, _ = aligned
    before, after = result.report["before"], result.report["after"]
    assert before["benign_accuracy_mean"] > 0.6  # the tasks were learnt in pretraining
    assert after["benign_accuracy_mean"] > before["benign_accuracy_mean"] - 0.02
    for name in tw.BENIGN_TASKS:
        assert after["benign_accuracy"][name] > before["benign_accuracy"][name] - 0.05, name


@pytest.mark.slow
def test_theta_star_is_reused_from_its_checkpoint(aligned):
    world, result, cache = aligned
    again = make_aligned_model(MODEL, world, seed=0, cache_dir=cache, progress=False)
    assert again.report["cached"]  # ``result`` may itself be read back: another test trained it
    assert {**again.report, "cached": None} == {**result.report, "cached": None}
    assert again.path == result.path and (result.path / "params").is_dir()
    a, b = ravel_pytree(result.theta_star)[0], ravel_pytree(again.theta_star)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert checkpoint_key(MODEL, WORLD, 1, AlignConfig()) != result.path.name
    assert checkpoint_key(MODEL, WORLD, 0, AlignConfig(pretrain_steps=10)) != result.path.name


def test_a_caller_waits_for_the_theta_star_being_trained_and_reads_it(tmp_path, monkeypatch):
    """make_aligned_model holds the checkpoint's lock while it trains: a caller arriving meanwhile
    (another process sharing the cache) waits, then reads the checkpoint instead of training."""
    import threading

    from quartic.harness import checkpoint
    from quartic.studies import training

    world = tw.TokenWorld(WORLD)
    path = tmp_path / checkpoint_key(MODEL, WORLD, 0, AlignConfig())
    trained, got = [], {}
    monkeypatch.setattr(training, "_train_aligned", lambda *args: trained.append(args))

    def caller():
        got["model"] = make_aligned_model(MODEL, world, cache_dir=tmp_path, progress=False)

    with checkpoint.lock(path):  # the first process, mid-training
        waiter = threading.Thread(target=caller)
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive()
        model = Transformer(MODEL, rngs=nnx.Rngs(0))
        save_theta_star(path, model, {"model_config": MODEL.to_dict(), "report": {"x": 1}})
    waiter.join(60)
    assert not trained
    assert got["model"].report == {"x": 1, "cached": True} and got["model"].path == path


def test_checkpoint_roundtrip_with_lora(tmp_path):
    cfg = dataclasses.replace(MODEL, lora_rank=2)  # shares MODEL's shapes: little to compile
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    save_theta_star(tmp_path / "ck", model, {"model_config": cfg.to_dict(), "note": "x"})
    loaded, meta = load_theta_star(tmp_path / "ck")
    assert meta["note"] == "x" and loaded.config == cfg
    for wrt in (nnx.Param, LoRAParam):
        a = ravel_pytree(functional(model, wrt)[1])[0]
        b = ravel_pytree(functional(loaded, wrt)[1])[0]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
