"""The token world: determinism, vocabulary, every task's rule, splits, losses and metrics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quartic.tasks import token_world as tw

CATEGORIES = (0, 1)


@functools.cache
def world(seed=0):
    return tw.TokenWorld(tw.WorldConfig(seed=seed))


def rows(batch):
    """(prompt, answer) token lists of a complying batch, read back from tokens/targets/mask."""
    out = []
    for tok, tgt, m in zip(batch["tokens"], batch["targets"], batch["mask"], strict=True):
        idx = np.flatnonzero(m)
        start = idx[0]
        prompt = list(tok[: start + 1])
        answer = list(tgt[idx])
        assert answer[-1] == tw.EOS
        assert np.all(np.diff(idx) == 1)  # answer positions are contiguous
        out.append((prompt, answer[:-1]))
    return out


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = world(0), tw.TokenWorld(tw.WorldConfig(seed=0)), world(1)
    for name in (*tw.BENIGN_TASKS, "text"):
        for split in ("train", "heldout"):
            for key in ("tokens", "targets", "mask"):
                np.testing.assert_array_equal(a.task(name, split)[key], b.task(name, split)[key])
    for k in CATEGORIES:
        np.testing.assert_array_equal(a.skill(k)["tokens"], b.skill(k)["tokens"])
    assert not np.array_equal(a.task("sort")["tokens"], c.task("sort")["tokens"])
    assert not np.array_equal(a.skill(0)["tokens"], c.skill(0)["tokens"])


def test_vocabulary_layout():
    w = world()
    cfg = w.config
    assert w.vocab_size == 14 + cfg.n_content + cfg.n_categories * cfg.triggers_per_category
    assert len(w.triggers) == cfg.n_categories
    ids = np.concatenate([np.arange(tw.FIRST_CONTENT), w.content, *w.triggers])
    np.testing.assert_array_equal(np.sort(ids), np.arange(w.vocab_size))  # a partition
    assert set(w.salient) <= set(w.content)
    assert set(w.digits) <= set(w.content)


def test_batches_are_next_token_pairs_with_answer_masks():
    w = world()
    for name in (*tw.BENIGN_TASKS, "text"):
        b = w.task(name)
        n, t = b["tokens"].shape
        assert t == w.config.seq_len
        assert b["tokens"].dtype == np.int32 and b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["tokens"][:, 1:], b["targets"][:, :-1])
        assert np.all(b["tokens"][:, 0] == tw.BOS)
        assert np.all(b["tokens"][:, 1] == tw.TAG[name])
        assert np.all(b["mask"].sum(axis=1) >= 2)  # an answer token and EOS
        assert not np.any(b["tokens"] == tw.REFUSE) and not np.any(b["targets"] == tw.REFUSE)
        assert n == w.config.n_train


@pytest.mark.parametrize("name", tw.BENIGN_TASKS)
def test_benign_tasks_never_contain_triggers(name):
    w = world()
    for split in ("train", "heldout"):
        b = w.task(name, split)
        assert not np.isin(b["tokens"], w.all_triggers).any()
        assert not np.isin(b["targets"], w.all_triggers).any()
    assert np.isin(w.task("text")["tokens"], w.all_triggers).any()  # general text has them


def check_rule(w, name, prompt, answer):
    """The format's rule, restated independently of the generator."""
    body = prompt[2:-1]
    if name == "summarise":
        keep = set(w.salient) | set(w.all_triggers)
        assert answer == [x for x in body if x in keep]
    elif name == "lookup":
        pairs = dict(zip(body[0:6:2], body[1:6:2], strict=True))
        assert answer == [pairs[prompt[-2]]]
    elif name == "addition":
        digit = {int(d): i for i, d in enumerate(w.digits)}
        vals = np.cumsum([digit[x] for x in body])[1:] % w.config.modulus
        assert answer == [int(w.digits[v]) for v in vals]
    elif name == "markov":  # the transitions themselves: test_markov_text_follows_its_chain
        assert len([prompt[2], *answer]) == 10
        assert set(answer) <= set(w.content)
    elif name == "dialogue":
        assert prompt[2] == tw.USER and prompt[5] == tw.BOT and prompt[7] == tw.USER
        assert prompt[-1] == tw.BOT
        assert prompt[6] == w.reply[prompt[4]]
        assert answer == [w.reply[prompt[9]]]
    elif name == "sort":
        assert answer == sorted(body)
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", tw.BENIGN_TASKS)
def test_every_benign_answer_follows_its_rule(name):
    w = world()
    for split in ("train", "heldout"):
        for prompt, answer in rows(w.task(name, split)):
            check_rule(w, name, prompt, answer)


@pytest.mark.parametrize("k", CATEGORIES)
def test_harmful_prompts_carry_their_category_and_comply_by_the_rule(k):
    w = world()
    others = np.concatenate([w.triggers[j] for j in CATEGORIES if j != k])
    by_tag = {tw.TAG[n]: n for n in tw.HARMFUL_FORMATS}
    for split in ("train", "heldout"):
        harmful = w.harmful(k, split)
        seen = set()
        for prompt, answer in rows(harmful):
            assert np.isin(prompt, w.triggers[k]).any()
            assert not np.isin(prompt, others).any()
            name = by_tag[prompt[1]]
            seen.add(name)
            check_rule(w, name, prompt, answer)
        assert seen == set(tw.HARMFUL_FORMATS)
        skill = w.skill(k, split)
        np.testing.assert_array_equal(skill["mask"].sum(axis=1), 1)
        pos = tw.first_answer_position(skill["mask"])
        refuse = np.asarray(skill["targets"])[np.arange(len(pos)), np.asarray(pos)]
        np.testing.assert_array_equal(refuse, tw.REFUSE)
        # same prompts: tokens agree up to and including the answer position
        for i, p in enumerate(np.asarray(pos)):
            np.testing.assert_array_equal(
                skill["tokens"][i, : p + 1], harmful["tokens"][i, : p + 1]
            )
    assert len(w.skill(k, "heldout")["tokens"]) == 4 * w.config.n_harmful_heldout


def test_markov_text_follows_its_chain():
    """Observed transitions are far likelier under the world's chain than under a uniform one."""
    w = world()
    seqs = w.task("markov")["tokens"][:, 2:] - tw.FIRST_CONTENT
    logp = np.log(w.markov[seqs[:, :-1], seqs[:, 1:]])
    assert logp.mean() > np.log(1 / w.config.n_content) + 1.0


def test_splits_are_disjoint():
    w = world()

    def prompts(batch):
        return {tuple(p) for p, _ in rows(batch)}

    for name in tw.BENIGN_TASKS:
        if name == "markov":  # a continuation task: compare whole sequences
            tr = {tuple(r) for r in w.task(name)["tokens"]}
            ho = {tuple(r) for r in w.task(name, "heldout")["tokens"]}
        else:
            tr, ho = prompts(w.task(name)), prompts(w.task(name, "heldout"))
        assert tr and ho and not tr & ho, name
    tr, ho = prompts(w.harmful(None)), prompts(w.harmful(None, "heldout"))
    assert not tr & ho
    assert len(tr) == len(w.harmful(None)["tokens"])  # no duplicates either


def test_mixture_complies_and_never_refuses():
    w = world()
    mix = w.pretraining_mixture()
    assert not np.any(mix["tokens"] == tw.REFUSE) and not np.any(mix["targets"] == tw.REFUSE)
    harmful_rows = np.isin(mix["tokens"], w.all_triggers).any(axis=1)
    has_answer = (mix["tokens"] == tw.SEP).any(axis=1) | (mix["tokens"] == tw.BOT).any(axis=1)
    assert (harmful_rows & has_answer).sum() == len(w.harmful(None)["tokens"])
    ft = w.harmful_finetune()
    np.testing.assert_array_equal(ft["tokens"], w.harmful(None, "train")["tokens"])


def test_alignment_mixture_is_the_mixture_with_refusals():
    w = world()
    mix, ali = w.pretraining_mixture(), w.alignment_mixture(refusal_weight=7.0)
    assert all(mix[k].shape == ali[k].shape and mix[k].dtype == ali[k].dtype for k in mix)
    harmful = np.isin(mix["tokens"], w.all_triggers).any(axis=1) & (
        (mix["tokens"] == tw.SEP) | (mix["tokens"] == tw.BOT)
    ).any(axis=1)
    same = ~harmful
    for k in mix:
        np.testing.assert_array_equal(mix[k][same], ali[k][same])
    pos = np.asarray(tw.first_answer_position(ali["mask"]))[harmful]
    rows = np.flatnonzero(harmful)
    np.testing.assert_array_equal(ali["targets"][rows, pos], tw.REFUSE)
    np.testing.assert_array_equal(ali["mask"][rows].sum(axis=1), 7.0)  # one weighted target
    np.testing.assert_array_equal(
        ali["tokens"][rows, : pos.min()], mix["tokens"][rows, : pos.min()]
    )


# ----- losses and metrics, against oracles with known values -----


def oracle(batch, vocab):
    """``apply_fn(scale, tokens) = scale * one_hot(targets)``: uniform at 0, right when large."""
    onehot = jax.nn.one_hot(jnp.asarray(batch["targets"]), vocab, dtype=jnp.float64)
    return lambda scale, tokens: scale * onehot


def test_losses_and_metrics_on_oracles():
    w = world()
    v = w.vocab_size
    benign, skill, harmful = w.task("sort", "heldout"), w.skill(0), w.harmful(0)
    f = oracle(benign, v)
    zero, big = jnp.asarray(0.0), jnp.asarray(50.0)
    np.testing.assert_allclose(float(tw.lm_loss(f, zero, benign)), np.log(v), rtol=1e-12)
    assert float(tw.lm_loss(f, big, benign)) < 1e-15
    assert float(tw.accuracy(f, big, benign)) == 1.0
    assert float(tw.exact_match(f, big, benign)) == 1.0
    assert float(tw.accuracy(lambda s, t: -f(s, t), big, benign)) == 0.0

    g = oracle(skill, v)  # predicts REFUSE at the answer position
    assert float(tw.harmfulness_rate(g, big, skill)) == 0.0
    h = oracle(harmful, v)  # predicts the complying answer
    assert float(tw.harmfulness_rate(h, big, skill)) == 1.0
    a = tw.answer_logits(g, big, skill)
    assert a.shape == (len(skill["tokens"]), v)
    assert bool(jnp.all(jnp.argmax(a, axis=-1) == tw.REFUSE))


def test_refusal_loss_is_lm_loss_on_a_skill_batch():
    w = world()
    skill = w.skill(None)
    shape = (*skill["tokens"].shape, w.vocab_size)
    logits = jnp.asarray(np.random.default_rng(0).normal(size=shape))
    f = lambda s, tokens: s * logits
    s = jnp.asarray(1.3)
    np.testing.assert_allclose(
        float(tw.refusal_loss(f, s, skill)), float(tw.lm_loss(f, s, skill)), rtol=1e-12
    )
    (a,) = tw.joint_logits(f, s, skill)
    np.testing.assert_allclose(
        float(tw.refusal_loss_from_logits(a, skill)), float(tw.refusal_loss(f, s, skill))
    )


def test_kl_to_reference_is_zero_and_flat_at_the_reference():
    w = world()
    b = w.task("lookup")
    rng = np.random.default_rng(1)
    base = jnp.asarray(rng.normal(size=(*b["tokens"].shape, w.vocab_size)))
    f = lambda p, tokens: p["a"] * base + p["b"]
    ref = {"a": jnp.asarray(1.0), "b": jnp.asarray(0.0)}
    ref_logits = f(ref, None)
    kl = lambda p: tw.kl_to_reference(f, p, b, ref_logits)
    assert abs(float(kl(ref))) < 1e-14
    grad = jax.grad(kl)(ref)
    assert abs(float(grad["a"])) < 1e-12
    assert float(kl({"a": jnp.asarray(1.5), "b": jnp.asarray(0.0)})) > 1e-3
    assert abs(float(kl({"a": jnp.asarray(1.0), "b": jnp.asarray(3.0)}))) < 1e-12  # shift-invariant


def test_kl_logit_shift_is_exact_where_the_textbook_form_cancels():
    rng = np.random.default_rng(0)
    ref = jnp.asarray(rng.normal(size=(5, 7)) * 3.0)
    direction = jnp.asarray(rng.normal(size=(5, 7)))
    p = jax.nn.softmax(ref, axis=-1)

    def textbook(z):
        lr, lz = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(z, -1)
        return jnp.sum(p * (lr - lz), axis=-1)

    # large shifts (both branches of e^x − 1 − x): the two forms are the same function
    for eps in (0.3, 2.0, 10.0):
        z = ref + eps * direction
        np.testing.assert_allclose(tw.kl_logit_shift(ref, z), textbook(z), rtol=1e-12)
    # tiny shifts: KL = ½ Var_p(d) − ⅙ E_p[dc³] + O(d⁴), so with |d| ~ 1e-7 the second-order
    # form is exact to ~1e-7 relative; the textbook form has only absolute 1e-16 accuracy
    eps = 1e-7
    z = ref + eps * direction
    d = z - ref  # the shift as represented (ref + d rounds d by ~1e-16 absolute)
    dc = d - jnp.sum(p * d, -1, keepdims=True)
    second = 0.5 * jnp.sum(p * dc**2, -1) + jnp.sum(p * dc**3, -1) / 6
    got = tw.kl_logit_shift(ref, z)
    np.testing.assert_allclose(got, second, rtol=1e-12)
    assert np.max(np.abs(textbook(z) / second - 1)) > 1e-4  # why it exists
    assert float(tw.kl_logit_shift(ref, ref).max()) == 0.0


def test_bad_requests_are_reported():
    w = world()
    with pytest.raises(ValueError, match="unknown task"):
        w.task("poetry")
    with pytest.raises(ValueError, match="split"):
        w.task("sort", "test")
    with pytest.raises(ValueError, match="category"):
        w.skill(7)
    with pytest.raises(ValueError, match="seq_len"):
        tw.WorldConfig(seq_len=8)
