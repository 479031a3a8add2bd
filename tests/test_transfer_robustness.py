"""quartic.studies.transfer and experiments/transfer_robustness.py: a tiny end-to-end run of the
pipeline, its summary, resume, the experiment's table and figures, bad configurations, and the model
helpers (LoRA merge, body carry-over, synonym rewrite, bag-of-words baseline)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quartic.core.errors import QuarticError
from quartic.harness import checkpoint
from quartic.harness.cli import load_experiment
from quartic.harness.runs import read_json
from quartic.models.transformer import Transformer, functional
from quartic.studies import transfer as tr
from quartic.studies.transfer import baseline, evaluate, models, pipeline, probe, trainer
from quartic.studies.transfer.attack import AttackConfig, make_attack_fn
from quartic.studies.transfer.summary import BRIDGE_QUANTITIES
from quartic.tasks import synonyms as syn

EXP = load_experiment("transfer_robustness")  # its table and figures


def tiny_config(**overrides):
    """Every stage, at the smallest scale that still runs them all (one pair, two seeds)."""
    base = dict(
        sizes=("2k",),
        archs=("encoder",),
        lora_size="",
        n_seeds=2,
        n_concepts=16,
        max_synonyms=4,
        n_stop=4,
        n_cues=3,
        n_shared=1,
        n_source=160,
        target_fraction=0.25,
        n_val=24,
        n_test=24,
        min_len=8,
        max_len=12,
        settings=("surface",),
        pairs=("hate>political",),
        corpus_size=64,
        pretrain_steps=8,
        source_steps=8,
        source_eval_every=4,
        target_steps=8,
        target_eval_every=4,
        batch_size=8,
        n_val_eval=16,
        budgets=(80, 2),
        n_attack=16,
        bridge_rank=2,
        bridge_iters=4,
        bridge_examples=16,
        # the first recipe (each architecture's read-out, no probe stage): LP-FT, the default,
        # has its own test (test_lp_ft_is_a_head_probe_then_the_stage)
        pooling="",
        probe_steps=0,
    )
    return pipeline.StudyConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer_robustness")
    config = tiny_config()
    summary = pipeline.run(config, out)
    return config, out, summary


@pytest.mark.slow
def test_tiny_run_produces_every_quantity(tiny_run):
    config, out, summary = tiny_run
    assert summary["num_failed"] == 0, summary["failures"]
    assert summary["budgets"] == ["80", "2", "unlimited"]
    cell = summary["cells"]["surface|encoder|2k|full"]
    assert set(cell["pairs"]) == {"hate>political"}
    for key in ("delta_oacc", "delta_asr_80", "delta_asr_2", "delta_asr_unlimited"):
        assert cell[key]["n"] == config.n_seeds and np.isfinite(cell[key]["mean"])
    unit = read_json(out / "units" / "transfer__surface__encoder__2k__full__hate-political.json")
    rec = unit["result"]["per_seed"][0]
    assert 0 < rec["best_step"] <= config.target_steps
    for name in ("80", "2", "unlimited"):
        m = rec["attacks"][name]
        # AUA = OAcc (1 - ASR) exactly (counts), and every metric of the paper is there
        assert m["accuracy_under_attack"] == pytest.approx(
            m["clean_accuracy"] * (1 - m["attack_success_rate"]), abs=1e-12
        )
        for key in ("mean_queries", "pct_words_perturbed", "margin_clean", "margin_attacked"):
            assert key in m
    # max_len 12 and 3 candidates: at most 36 queries, so budget 80 is the unlimited attack
    assert rec["attacks"]["80"]["identical_to_unlimited"] is True
    assert rec["attacks"]["2"]["identical_to_unlimited"] is False
    assert rec["attacks"]["2"]["mean_queries"] <= 2
    # best checkpoint: the source stage's reported loss is the minimum of its validation curve
    src = read_json(out / "units" / "source__surface__encoder__2k__full__hate.json")["result"]
    np.testing.assert_allclose(src["best_val_loss"], np.min(src["val_curve"], axis=1))
    bridge = summary["bridge"]["surface|encoder"]["per_pair"]["hate>political"]
    for q in BRIDGE_QUANTITIES:
        assert len(bridge[q]) == config.n_seeds and np.isfinite(bridge[q]).all()
    assert all(0 <= v <= 1 + 1e-5 for v in bridge["transfer"]["overlap"])
    assert checkpoint.exists(out / "cache" / "pretrained" / "encoder_2k")
    assert set(summary["bow_baseline"]) == {"surface|hate", "surface|political"}
    base = summary["bow_baseline"]["surface|political"]
    assert base["target_train"]["n_rows"] == 40 and base["source_train"]["n_rows"] == 160
    rows = EXP.table(summary)
    assert any("ΔASR@80" in r["quantity"] for r in rows)
    assert all(r["experiment"] == "transfer_robustness" for r in rows)
    # the task probe: each target's rows, both arms, one accuracy per seed, and its table row
    tp = summary["pretrain"]["pretrain__encoder__2k"]["task_probe"]
    assert set(tp) == {"surface|political"}
    for arm in ("pretrained", "init"):
        accs = tp["surface|political"][arm]["seeds"]
        assert len(accs) == config.n_seeds and all(0 <= a <= 1 for a in accs)
    assert any("linear probe of the pooled features" in r["quantity"] for r in rows)


@pytest.mark.slow
def test_rerun_recomputes_nothing(tiny_run, tmp_path, monkeypatch):
    config, out, summary = tiny_run
    files = sorted((out / "units").glob("*.json")) + sorted((out / "cache").rglob("meta.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    calls = []
    original = trainer.fit

    def counting_fit(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "fit", counting_fit)  # the module the pipeline calls through
    again = pipeline.run(config, out)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert again["cells"] == summary["cells"]
    paths = EXP.plot(out, tmp_path)
    assert [p.name for p in paths] == [
        "transfer_robustness.png",
        "transfer_robustness_bridge.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in paths)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_fraction": 0.0}, "target_fraction"),
        ({"budgets": (0,)}, "budget"),
        ({"sizes": ("3k",)}, "unknown model size"),
        ({"archs": ("rnn",)}, "unknown architecture"),
        ({"settings": ("loud",)}, "unknown setting"),
        ({"pairs": ("hate>hate",)}, "pair"),
        ({"cue_concepts": (0, 1)}, "cue_concepts"),
        ({"lora_size": "30k"}, "lora_size"),
        ({"pooling": "sum"}, "pooling"),
        ({"probe_steps": -1}, "probe_steps"),
    ],
)
def test_bad_configurations_raise(overrides, message):
    with pytest.raises(QuarticError, match=message):
        tiny_config(**overrides)


def test_cue_set_outside_the_vocabulary_raises(tmp_path):
    config = tiny_config(cue_concepts=(0, 1, 2, 3, 4, 5, 6, 7, 99))
    with pytest.raises(QuarticError, match=r"outside the vocabulary"):
        pipeline.run(config, tmp_path)
    assert not (tmp_path / "units").exists()  # refused before any work


def test_model_config_errors():
    with pytest.raises(QuarticError, match="unknown model size"):
        tr.model_config("5k", "decoder", vocab_size=40, seq_len=8)
    with pytest.raises(QuarticError, match="unknown architecture"):
        tr.model_config("2k", "lstm", vocab_size=40, seq_len=8)
    with pytest.raises(QuarticError, match="multiple of eval_every"):
        tr.FitConfig(n_steps=10, eval_every=3)
    with pytest.raises(QuarticError, match="pooling"):
        tr.model_config("2k", "decoder", vocab_size=40, seq_len=8, pooling="sum")


def test_lp_ft_is_a_head_probe_then_the_stage(tmp_path):
    """probe_steps > 0: the head alone on the frozen body first, then the stage from the probe's
    best checkpoint, in the study's target unit exactly as composed here by hand; pooling reaches
    the classifier and leaves the language model (and so the pretrained body) as it was."""
    config = tiny_config(archs=("decoder",), pooling="mean", probe_steps=4)
    size, arch, target = "2k", "decoder", "political"
    rec = pipeline.target_unit(config, tmp_path, "surface", size, arch, "full", target)
    clf = pipeline.model_cfg(config, size, arch)
    assert (clf.pooling, pipeline.model_cfg(tiny_config(), size, arch).pooling) == ("mean", "last")
    lm = pipeline.model_cfg(config, size, arch, head="lm")
    assert lm == pipeline.model_cfg(tiny_config(), size, arch, head="lm")
    split = pipeline.world(config)[2][("surface", target)]
    val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
    start = pipeline.initial_classifiers(config, tmp_path, size, arch, "full")
    unit = ("target", "surface", size, arch, "full", target, "direct")
    probe = trainer.FitConfig(config.probe_steps, config.batch_size, config.probe_lr, 1)
    probed = trainer.fit("clf", clf, start, split.target_train, val,
                         pipeline._keys(config, "probe", *unit), probe, trainable="head").params  # fmt: skip
    after = dict(jax.tree_util.tree_leaves_with_path(probed))
    for path, before in jax.tree_util.tree_leaves_with_path(start):  # the head moved, nothing else
        in_head = path[0].key == "head"
        assert np.array_equal(before, after[path]) != in_head, jax.tree_util.keystr(path)
    fc = trainer.FitConfig(
        config.target_steps, config.batch_size, config.lr, config.target_eval_every
    )
    res = trainer.fit(
        "clf", clf, probed, split.target_train, val, pipeline._keys(config, *unit), fc
    )
    probs = trainer.predict(clf, res.params, split.test["tokens"])
    acc = (probs.argmax(-1) == np.asarray(split.test["labels"])[None, :]).mean(axis=1)
    assert [r["test_accuracy"] for r in rec["per_seed"]] == acc.tolist()
    assert [r["best_step"] for r in rec["per_seed"]] == res.best_step.tolist()


@pytest.fixture(scope="module")
def small_lang():
    return syn.make_language(syn.LanguageConfig(n_concepts=12, max_synonyms=4, n_stop=4, seed=2))


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_probe_on_cached_features_takes_the_steps_of_the_full_forward(pooling):
    """A linear probe (``trainable="head"``) trains the head on the frozen body's features
    computed once; ``cache_features=False`` runs the body at every step, as the probe did before.
    The two are the same minibatch Adam on the same function of the head, so in float64 they
    agree to rounding: 1e-12 relative leaves room for XLA rounding the features differently in the
    two programs (~1e-16) through 24 steps of a two-class linear head. Three models (vmapped),
    80 training rows in batches of 8 (the last feature chunk partly filled)."""
    config = tiny_config(archs=("decoder",), pooling=pooling, n_seeds=3)
    clf = dataclasses.replace(pipeline.model_cfg(config, "2k", "decoder"), param_dtype="float64")
    split = pipeline.world(config)[2][("surface", "political")]
    train = {k: v[:76] for k, v in split.source_train.items()}  # 76 = 9 · 8 + 4
    val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
    start = models.stack([models.init_params(clf, 1000 + i) for i in range(3)])
    fc = trainer.FitConfig(24, 8, 1e-2, 6)
    keys = pipeline._keys(config, "probe", pooling)
    fit = lambda cached: trainer.fit(  # noqa: E731
        "clf", clf, start, train, val, keys, fc, trainable="head", cache_features=cached
    )
    cached, full = fit(True), fit(False)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), full.params, start))
    assert any(moved), "the reference probe did not move the head"
    for a, b in zip(jax.tree.leaves(cached.params), jax.tree.leaves(full.params), strict=True):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(b))))
    np.testing.assert_allclose(cached.val_curve, full.val_curve, rtol=1e-12)
    np.testing.assert_allclose(cached.train_curve, full.train_curve, rtol=1e-12)
    assert np.array_equal(cached.best_step, full.best_step)


_TRACES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: (
        _TRACES.append(event) if event == "/jax/core/compile/jaxpr_trace_duration" else None
    )
)


@pytest.mark.parametrize("method", ["a2t", "wir"])
def test_attack_models_one_program_for_every_budget(method):
    """``attack_models`` passes the query budget to one compiled program as an argument: every
    budget (binding, loose, none) gives, model by model, the attack compiled with that budget
    fixed (``make_attack_fn``, the budget a constant; one model, one chunk): the same tokens,
    statuses and counts, and probabilities equal to float64 rounding (the two programs' shapes
    differ). The second and third budgets trace nothing new."""
    config = tiny_config(archs=("decoder",), n_seeds=2)
    lang, _, splits, table = pipeline.world(config)
    clf = dataclasses.replace(pipeline.model_cfg(config, "2k", "decoder"), param_dtype="float64")
    params = models.stack([models.init_params(clf, 7 + i) for i in range(2)])
    test = {k: v[:12] for k, v in splits[("surface", "political")].test.items()}
    fns = models._model_fns(clf)
    logits_fn = lambda p, emb, tokens: fns.from_embeddings(p, emb, tokens != clf.pad_id)  # noqa: E731
    statuses = set()
    for i, budget in enumerate((3, 40, None)):
        ac = AttackConfig(query_budget=budget, method=method, mask_token=syn.PAD)
        before = len(_TRACES)
        got = evaluate.attack_models(clf, params, test, table, ac, batch_size=5)
        if i:
            assert len(_TRACES) == before, f"budget {budget} traced a new program"
        fixed = make_attack_fn(fns.embed, logits_fn, ac)
        for m, res in enumerate(got):
            one = jax.tree.map(lambda x, m=m: x[m], params)
            want = fixed(one, jnp.asarray(test["tokens"]), jnp.asarray(test["labels"]), table)
            for field in res._fields:  # probabilities: two programs' float64 rounding
                a, b = getattr(res, field), np.asarray(getattr(want, field))
                if field.endswith("probs"):
                    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15, err_msg=field)
                else:
                    np.testing.assert_array_equal(a, b, err_msg=field)
            statuses |= set(res.status.tolist())
    assert len(statuses) > 1, "every example ended the same way: the comparison is too weak"


def test_lora_merge_and_body_carry(small_lang):
    v = small_lang.vocab_size
    lm = tr.model_config("2k", "decoder", vocab_size=v, seq_len=10, head="lm")
    clf = tr.model_config("2k", "decoder", vocab_size=v, seq_len=10, lora_rank=2)
    plain = dataclasses.replace(clf, lora_rank=0)
    body = tr.init_params(lm, 0)
    params = tr.carry_body(tr.init_params(clf, 1), body)
    # the body comes from the LM, the head and the adapters do not
    np.testing.assert_array_equal(params["token_embed"], body["token_embed"])
    assert params["head"]["kernel"].shape == (clf.d_model, 2)
    # give the adapters a non-zero B, so the merge has something to fold in
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * rng.normal(size=x.shape).astype(x.dtype)
            if "lora_b" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )
    merged = tr.merge_lora(params)
    tokens = jnp.asarray(syn.pretrain_corpus(small_lang, 4, 10, 0))
    call_lora = models._model_fns(clf).call
    call_plain = models._model_fns(plain).call
    a = jax.jit(call_lora)(params, tokens)
    b = jax.jit(call_plain)(merged, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert not np.allclose(
        np.asarray(b),
        np.asarray(jax.jit(call_plain)(tr.merge_lora(tr.init_params(clf, 1)), tokens)),
    )


def test_save_load_roundtrip(tmp_path, small_lang):
    cfg = tr.model_config("2k", "encoder", vocab_size=small_lang.vocab_size, seq_len=10)
    one = tr.init_params(cfg, 3)
    stacked = tr.stack([tr.init_params(cfg, i) for i in range(2)])
    for name, params in (("one", one), ("stacked", stacked)):
        path = tr.save_params(tmp_path / name, cfg, params, {"val": [1.5, 2.0]})
        back, info = tr.load_params(path, cfg)
        assert info == {"val": [1.5, 2.0]}
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
            assert np.shape(x) == np.shape(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a checkpoint of another model config is refused by name, not misread
    other = tr.model_config("2k", "decoder", vocab_size=small_lang.vocab_size, seq_len=10)
    with pytest.raises(QuarticError, match="another model config"):
        tr.load_params(tmp_path / "one", other)
    with pytest.raises(QuarticError, match="no checkpoint"):
        tr.load_params(tmp_path / "missing", cfg)


def test_synonym_rewrite_keeps_concepts(small_lang):
    tokens = syn.pretrain_corpus(small_lang, 32, 12, 1)
    tokens[:, -2:] = syn.PAD
    out = tr.synonym_rewrite(small_lang, tokens, seed=0)
    np.testing.assert_array_equal(small_lang.concept_of[out], small_lang.concept_of[tokens])
    fixed = ~small_lang.is_content[tokens]
    np.testing.assert_array_equal(out[fixed], tokens[fixed])
    assert (out != tokens).mean() > 0.2  # clusters have >= 2 members: many tokens change


def test_budget_that_cannot_bind_is_unlimited():
    assert tr.budget_is_unlimited(None, 20, 5)
    assert tr.budget_is_unlimited(100, 20, 5) and not tr.budget_is_unlimited(99, 20, 5)
    # the deletion ranking scores up to 20 masked sequences first
    assert tr.budget_is_unlimited(120, 20, 5, "wir") and not tr.budget_is_unlimited(
        119, 20, 5, "wir"
    )


@pytest.mark.slow
def test_second_attack_through_the_pipeline(tiny_run, tmp_path):
    """The deletion-ranked attack as the study's attack (cached models of the tiny run): the same
    fine-tuned models and clean accuracy, its own ASR, AUA = OAcc (1 - ASR) from the counts, and
    every budget respected."""
    config, out, _ = tiny_run
    wir = dataclasses.replace(config, attack_method="wir")
    args = (out, "surface", "2k", "encoder", "full", "political")
    rec_a2t = pipeline.target_unit(config, *args)
    rec = pipeline.target_unit(wir, *args)
    for s, s_a2t in zip(rec["per_seed"], rec_a2t["per_seed"], strict=True):
        assert s["test_accuracy"] == s_a2t["test_accuracy"]
        for name in ("80", "2", "unlimited"):
            m = s["attacks"][name]
            assert m["clean_accuracy"] == s_a2t["attacks"][name]["clean_accuracy"]
            assert m["accuracy_under_attack"] == pytest.approx(
                m["clean_accuracy"] * (1 - m["attack_success_rate"]), abs=1e-12
            )
        assert s["attacks"]["80"]["identical_to_unlimited"] is True  # 80 >= 12 * 3 + 12
        assert s["attacks"]["2"]["mean_queries"] <= 2
    with pytest.raises(QuarticError, match="method"):
        tiny_config(attack_method="textfooler")


def test_bow_logistic_is_the_exact_penalised_optimum():
    """Newton's answer against an independent check: jax.grad of the penalised loss vanishes there
    (float64: ~1e-15), and moving any weight raises the loss (strict convexity); a word that decides
    the label is learned perfectly; labels outside {0, 1} are refused."""
    rng = np.random.default_rng(0)
    vocab, n = 12, 200
    tokens = rng.integers(1, vocab, size=(3 * n, 8))
    tokens[:, 6:] = 0  # padding
    labels = (tokens == 5).any(axis=1).astype(np.int32)
    split = lambda i: {"tokens": tokens[i * n : (i + 1) * n], "labels": labels[i * n : (i + 1) * n]}
    fit = tr.bow_logistic(split(0), split(1), split(2), vocab, l2_grid=(1e-2,))
    assert fit.test_accuracy == 1.0 and fit.weights[5] == fit.weights.max()
    assert fit.weights[0] == 0.0  # PAD is not a word

    x = jnp.asarray(baseline._bow_features(split(0)["tokens"], vocab))
    y = jnp.asarray(split(0)["labels"], dtype=jnp.float64)

    def penalised(w):
        z = x @ w
        return jnp.mean(jax.nn.softplus(z) - y * z) + 0.5 * fit.l2 * jnp.sum(w[:-1] ** 2)

    w = jnp.concatenate([jnp.asarray(fit.weights), jnp.asarray([fit.bias])])
    assert float(jnp.linalg.norm(jax.grad(penalised)(w))) < 1e-12
    assert fit.grad_norm < 1e-12
    for i in (1, 5, vocab):
        assert float(penalised(w.at[i].add(1e-3))) > float(penalised(w))
    with pytest.raises(QuarticError, match="labels in"):
        tr.bow_logistic({**split(0), "labels": split(0)["labels"] + 1}, split(1), split(2), vocab)


def test_task_probe_is_the_exact_probe_of_the_heads_input():
    """``probe.task_probe`` fits ``feature_logistic`` on the pooled features the classifier head
    reads: the same accuracies as the probe fitted here on ``Transformer.layer_features``' last
    depth (another program, float64: identical predictions), and as ``probe_accuracies`` of the
    stacked depths at the last one; bad splits are named."""
    config = tiny_config(archs=("decoder",), n_seeds=2)
    clf = dataclasses.replace(pipeline.model_cfg(config, "2k", "decoder"), param_dtype="float64")
    split = pipeline.world(config)[2][("surface", "political")]
    data = {"train": split.target_train, "val": split.val, "test": split.test}
    params = [models.init_params(clf, 1000 + i) for i in range(2)]
    got = probe.task_probe(clf, params, data)
    apply, _ = functional(Transformer(clf, rngs=nnx.Rngs(0)), method="layer_features")
    want = []
    for p in params:
        feats = {k: np.asarray(apply(p, d["tokens"])[-1]) for k, d in data.items()}
        labels = {k: d["labels"] for k, d in data.items()}
        want.append(tr.feature_logistic(feats, labels).test_accuracy)
    assert got["seeds"] == want and got["mean"] == pytest.approx(np.mean(want), abs=1e-15)
    # features stacked over depth: one probe per depth, the last being the head's input
    stacked = probe.probe_accuracies(apply, params, data)
    depths = apply(params[0], split.val["tokens"]).shape[0]
    assert stacked.shape == (2, depths) and stacked[:, -1].tolist() == want
    with pytest.raises(QuarticError, match="splits"):
        probe.task_probe(clf, params, {"train": split.target_train})


def test_pretrained_with_another_mask_rate_is_its_own_model(tmp_path):
    """``pretrained(mask_rate=...)`` pretrains the encoder with that masked-token rate and caches
    it under its own name, beside (not instead of) the study's; a decoder has no mask rate."""
    config = tiny_config(n_seeds=1)
    study, _ = pipeline.pretrained(config, tmp_path, "2k", "encoder")
    other, _ = pipeline.pretrained(config, tmp_path, "2k", "encoder", mask_rate=0.5)
    cached = sorted(p.name for p in (tmp_path / "cache" / "pretrained").iterdir())
    assert cached == ["encoder_2k", "encoder_2k_mask0.5"]
    leaves = zip(jax.tree.leaves(study), jax.tree.leaves(other), strict=True)
    assert any(not np.array_equal(a, b) for a, b in leaves)
    again, _ = pipeline.pretrained(config, tmp_path, "2k", "encoder", mask_rate=0.5)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(other), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(QuarticError, match="mask_rate"):
        pipeline.pretrained(config, tmp_path, "2k", "decoder", mask_rate=0.5)


def test_pretrain_lrs_give_one_model_its_own_rate(tmp_path):
    """A ``pretrain_lrs`` entry replaces ``pretrain_lr`` for its model only: "ARCH_SIZE" before
    "SIZE"; pretraining with it is bit for bit pretraining with that ``pretrain_lr``; bad entries
    are named."""
    config = tiny_config(n_seeds=1, pretrain_lrs=("2k:1e-2", "encoder_2k:1e-3"))
    assert config.pretrain_lr_for("2k", "encoder") == 1e-3
    assert config.pretrain_lr_for("2k", "decoder") == 1e-2
    assert config.pretrain_lr_for("7k", "encoder") == config.pretrain_lr
    got, _ = pipeline.pretrained(config, tmp_path / "a", "2k", "encoder")
    plain = tiny_config(n_seeds=1, pretrain_lr=1e-3)
    want, _ = pipeline.pretrained(plain, tmp_path / "b", "2k", "encoder")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    default, _ = pipeline.pretrained(tiny_config(n_seeds=1), tmp_path / "c", "2k", "encoder")
    leaves = zip(jax.tree.leaves(got), jax.tree.leaves(default), strict=True)
    assert any(not np.array_equal(a, b) for a, b in leaves)
    for bad in ("1m", "3m:1e-3", "lstm_1m:1e-3", "1m:0", "1m:fast"):
        with pytest.raises(QuarticError, match="pretrain_lrs"):
            tiny_config(pretrain_lrs=(bad,))


def test_bow_logistic_counts_groups_as_one_word():
    """``groups`` counts a group of tokens in one column: the fit equals the plain fit on the
    tokens rewritten to their groups (float64 rounding only); the default grouping is the
    plain fit; a wrong-sized grouping is refused."""
    rng = np.random.default_rng(1)
    vocab, n = 10, 150
    tokens = rng.integers(1, vocab, size=(3 * n, 7))
    tokens[:, 5:] = 0
    labels = np.isin(tokens, (4, 7)).any(axis=1).astype(np.int32)  # 4 and 7: one "concept"
    groups = np.array([-1, 0, 1, 2, 3, 4, 5, 3, 6, 7])  # 7 joins 4 (column 3); PAD uncounted
    rewritten = groups[tokens] + 1  # PAD -> 0, group g -> token g + 1

    def split(t, i):
        return {"tokens": t[i * n : (i + 1) * n], "labels": labels[i * n : (i + 1) * n]}

    grouped = tr.bow_logistic(*(split(tokens, i) for i in range(3)), vocab, groups=groups)
    plain = tr.bow_logistic(*(split(rewritten, i) for i in range(3)), 9)
    np.testing.assert_allclose(grouped.weights, plain.weights[1:], rtol=1e-10, atol=1e-12)
    assert grouped.l2 == plain.l2 and grouped.test_accuracy == plain.test_accuracy == 1.0
    identity = np.arange(vocab)
    identity[0] = -1
    a = tr.bow_logistic(*(split(tokens, i) for i in range(3)), vocab, groups=identity)
    b = tr.bow_logistic(*(split(tokens, i) for i in range(3)), vocab)
    np.testing.assert_array_equal(a.weights, b.weights)
    with pytest.raises(QuarticError, match="groups"):
        tr.bow_logistic(*(split(tokens, i) for i in range(3)), vocab, groups=groups[:-1])


def test_feature_logistic_is_a_standardised_exact_probe():
    """The probe standardises each column on the training split, so any affine rescaling of a
    column gives the same fit (rounding only); it converges (Newton: gradient ~1e-15); a
    feature that decides the label is learned; bad splits and shapes are named."""
    rng = np.random.default_rng(2)
    n = 200
    x = rng.normal(size=(3 * n, 4))
    y = (x[:, 1] + 0.1 * rng.normal(size=3 * n) > 0).astype(np.int32)
    feats = {k: x[i * n : (i + 1) * n] for i, k in enumerate(("train", "val", "test"))}
    labels = {k: y[i * n : (i + 1) * n] for i, k in enumerate(("train", "val", "test"))}
    fit = tr.feature_logistic(feats, labels)
    assert fit.grad_norm < 1e-12 and fit.test_accuracy > 0.9
    assert int(np.argmax(np.abs(fit.weights))) == 1
    scale, shift = np.array([3.0, 0.01, 100.0, 1.0]), np.array([5.0, -2.0, 0.0, 1e3])
    moved = tr.feature_logistic({k: v * scale + shift for k, v in feats.items()}, labels)
    np.testing.assert_allclose(moved.weights, fit.weights, rtol=1e-8)
    assert moved.test_accuracy == fit.test_accuracy and moved.l2 == fit.l2
    with pytest.raises(QuarticError, match="splits"):
        tr.feature_logistic({"train": feats["train"]}, labels)
    with pytest.raises(QuarticError, match=r"\[N, p\]"):
        tr.feature_logistic({**feats, "val": feats["val"][:-1]}, labels)


@pytest.mark.slow
def test_schedule_probe_reproduces_the_direct_arm_and_tries_others(tiny_run, tmp_path):
    """The probe's copy of the run's own schedule gives the run's direct units bit for bit (same
    keys, same program); another schedule is a different fit; bad input is named."""
    config, out, _ = tiny_run
    probe = load_experiment("transfer_lr_probe")
    own = f"{config.lr:g}:{config.target_steps}:{config.batch_size}"
    pc = probe.Config(
        transfer_results=str(out), size="2k", archs=("encoder",), targets=("political",),
        schedules=(own, "3e-4:12:8"),
    )  # fmt: skip
    summary = probe.run(pc, tmp_path / "probe")
    assert summary["reproduces_run"] and summary["n_compared"] == 1
    cells = summary["cells"]
    assert set(cells) == {f"encoder|{own}", "encoder|3e-4:12:8"}
    assert all(0 < s <= 12 for s in cells["encoder|3e-4:12:8"]["best_step"])
    assert summary["bow_baseline"]["political"] == pytest.approx(
        100 * read_json(out / "units" / "baseline__surface__political.json")["result"][
            "target_train"]["test_accuracy"], abs=1e-12
    )  # fmt: skip
    assert [r["verdict"] for r in probe.table(summary)][-1] == "yes"
    # by default it probes the transfer_robustness run beside its own folder
    assert probe.transfer_dir(probe.Config(), tmp_path / "quick" / "transfer_lr_probe") == (
        tmp_path / "quick" / "transfer_robustness"
    )
    with pytest.raises(QuarticError, match="is not lr:steps:batch"):
        probe.parse_schedule("3e-4/12")
    with pytest.raises(QuarticError, match="no transfer_robustness run at"):
        probe.run(dataclasses.replace(pc, transfer_results=str(tmp_path / "none")), tmp_path / "p2")
