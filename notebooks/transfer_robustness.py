# %% [markdown]
# # Transfer learning and adversarial robustness, in miniature
#
# The companion paper (Turbal et al., arXiv:2501.00066; docs/theory.md §5) fine-tunes a pretrained model
# on a small *target* task either **directly** or **through a large source task** first, and finds
# that transfer raises clean accuracy (OAcc) but also the success rate of a synonym-substitution
# attack (ASR). quartic reproduces the protocol on its own transformers and a synthetic synonym
# language (`quartic.studies.transfer`, `quartic.tasks.synonyms`, the A2T-style attack of
# `quartic.studies.transfer.attack`).
#
# This notebook runs one cell of that protocol: a 7k-parameter decoder pretrained by next-token
# prediction, the pair `hate > political`, 3 seeds, once with the **surface-form knob** on (the
# source task writes its positive cues only in privileged synonyms, its negatives carry decoys in
# the other forms) and once with it off. What the full sweep found (README,
# `quartic run transfer_robustness`): with the knob on, transfer raises ASR in every cell; with it
# off the differences are smaller and mostly within seed noise (decoder 7k: +7.4 ± 5.6 points);
# clean accuracy stays low (51–76 %) at these sizes.
#
# A run this small is noisy and its models are barely above chance on the target, so the cells
# assert the protocol's invariants and the mechanism (the knob makes the *source* model
# attackable: it keys on surface forms that a synonym swap removes), and print ΔOAcc and ΔASR as
# measured, without asserting their sign.

# %%
import os
import pathlib
import tempfile

import jax

jax.config.update("jax_enable_x64", True)
import numpy as np

from quartic.harness import plotting
from quartic.studies import transfer as tr
from quartic.studies.transfer.attack import AttackConfig, synonym_table
from quartic.studies.transfer.robustness_metrics import robustness_metrics
from quartic.tasks import synonyms as syn

OUT = pathlib.Path(os.environ.get("QUARTIC_NOTEBOOK_OUT") or tempfile.mkdtemp(prefix="quartic_"))
SEEDS, LEN = 3, 20
lang = syn.make_language(syn.LanguageConfig(n_concepts=30, max_synonyms=6, n_stop=8, seed=0))
tasks = {t.name: t for t in syn.bias_tasks(lang, n_cues=6, n_shared=3)}
table = synonym_table(lang.candidates, lang.is_content, lang.is_word)
keys = lambda tag: jax.random.split(jax.random.PRNGKey(tag), SEEDS)  # noqa: E731
print(f"vocabulary {lang.vocab_size} tokens, {lang.n_concepts} concepts; tasks {list(tasks)}")


def splits(surface: bool):
    cfg = syn.TaskDataConfig(
        n_source=6_000, n_val=200, n_test=200, min_len=10, max_len=LEN,
        surface_bias=1.0 if surface else 0.0, decoy_rate=0.5 if surface else 0.0,
    )  # fmt: skip
    return {name: syn.make_task_splits(lang, t, cfg, seed=0) for name, t in tasks.items()}


# %% [markdown]
# ## Pretrain, then fine-tune directly and through the source task
#
# `tr.fit` trains the 3 seeds at once (one jitted `lax.scan`, vmapped) and keeps the checkpoint with
# the lowest validation loss. Both arms start from the same pretrained body and the same fresh
# classifier head; the transfer arm first fits the source task (`hate`), then the target.

# %%
ARCH, SIZE = "decoder", "7k"
lm_cfg = tr.model_config(SIZE, ARCH, vocab_size=lang.vocab_size, seq_len=LEN, head="lm")
clf_cfg = tr.model_config(SIZE, ARCH, vocab_size=lang.vocab_size, seq_len=LEN)
corpus = syn.pretrain_corpus(lang, 8_000, LEN, seed=0)
held_out = syn.pretrain_corpus(lang, 256, LEN, seed=1)
init = tr.stack([tr.init_params(lm_cfg, 100 + i) for i in range(SEEDS)])
pre = tr.fit(
    "mlm" if ARCH == "encoder" else "lm", lm_cfg, init, {"tokens": corpus}, {"tokens": held_out}, keys(1),
    tr.FitConfig(1_000, 32, 3e-3, 250), desc="pretrain",
)  # fmt: skip
print("pretraining validation loss:", np.round(pre.val_curve[:, [0, -1]], 3).tolist())
assert np.all(pre.val_curve[:, -1] < pre.val_curve[:, 0])
start = tr.stack(
    [
        tr.carry_body(tr.init_params(clf_cfg, 1000 + i), body)
        for i, body in enumerate(tr.unstack(pre.params))
    ]
)


def fine_tune(params, split, stage, tag):
    """The source stage (400 steps) validates on rows held out of its own train split; the target
    stage (200 steps on the small target train split) on the target's validation split."""
    if stage == "source":
        train = {k: v[:-200] for k, v in split.source_train.items()}
        val = {k: v[-200:] for k, v in split.source_train.items()}
        fc = tr.FitConfig(400, 32, 1e-3, 100)
    else:
        train, val = split.target_train, split.val
        fc = tr.FitConfig(200, 32, 1e-3, 25)
    return tr.fit("clf", clf_cfg, params, train, val, keys(tag), fc, desc=stage).params


def evaluate(params, split):
    """Clean accuracy on the target test set and the attack's metrics, one dict per seed."""
    ac = AttackConfig(max_candidates=20, query_budget=None)
    results = tr.attack_models(clf_cfg, params, split.test, table, ac, batch_size=512)
    return [robustness_metrics(r) for r in results]


rows, source_asr = {}, {}
for surface in (True, False):
    data = splits(surface)
    src = fine_tune(start, data["hate"], "source", 2)
    source_asr[surface] = np.array([m.attack_success_rate for m in evaluate(src, data["hate"])])
    direct = fine_tune(start, data["political"], "target", 3)
    transfer = fine_tune(src, data["political"], "target", 3)
    rows[surface] = {"direct": evaluate(direct, data["political"])}
    rows[surface]["transfer"] = evaluate(transfer, data["political"])

# %% [markdown]
# ## The mechanism: the surface-biased source model is the attackable one
#
# The source models attacked on their own (unbiased) test split: with the knob on they key on the
# privileged synonyms, which the attack swaps out.

# %%
print("source ASR, knob on :", np.round(source_asr[True], 3))
print("source ASR, knob off:", np.round(source_asr[False], 3))
assert source_asr[True].min() > source_asr[False].max()

# %% [markdown]
# ## The attack's invariants, and ΔOAcc / ΔASR
#
# The metrics are those of the paper: AUA = OAcc·(1 − ASR) exactly (ASR counts successes among the
# examples the model got right), and every example is either skipped (wrong already), succeeded or
# failed.

# %%
for arms in rows.values():
    for metrics in arms.values():
        for m in metrics:
            assert m.n_skipped + m.n_succeeded + m.n_failed == m.n_examples
            np.testing.assert_allclose(
                m.accuracy_under_attack, m.clean_accuracy * (1 - m.attack_success_rate), rtol=1e-12
            )
summary = {}
for surface, arms in rows.items():
    oacc = {a: np.array([m.clean_accuracy for m in ms]) for a, ms in arms.items()}
    asr = {a: np.array([m.attack_success_rate for m in ms]) for a, ms in arms.items()}
    d_oacc, d_asr = (
        100 * (oacc["transfer"] - oacc["direct"]),
        100 * (asr["transfer"] - asr["direct"]),
    )
    summary[surface] = (oacc, asr, d_asr)
    name = "surface knob on " if surface else "surface knob off"
    print(
        f"{name}: OAcc direct {oacc['direct'].mean():.3f} transfer {oacc['transfer'].mean():.3f}"
        f" | ASR direct {asr['direct'].mean():.3f} transfer {asr['transfer'].mean():.3f}"
        f" | ΔOAcc {d_oacc.mean():+.1f} ± {d_oacc.std():.1f} pts,"
        f" ΔASR {d_asr.mean():+.1f} ± {d_asr.std():.1f} pts"
    )

# %% [markdown]
# ## The figure: ASR by arm, with and without the surface-form knob

# %%
fig, axes = plotting.figure(1, 1, size=(4.6, 3.2))
ax = axes[0, 0]
for j, surface in enumerate((True, False)):
    _, asr, _ = summary[surface]
    for k, arm in enumerate(("direct", "transfer")):
        x = 3 * j + k
        ax.bar(x, asr[arm].mean(), color=("C0", "C3")[k], label=arm if j == 0 else None)
        ax.plot(np.full(SEEDS, x), asr[arm], "k.", ms=4)
ax.set_xticks([0.5, 3.5], ["surface knob on", "surface knob off"])
ax.set_ylabel("attack success rate (ASR)")
ax.set_title(f"hate → political, {ARCH} {SIZE}, {SEEDS} seeds", fontsize=9)
ax.legend(fontsize=8)
plotting.save(fig, OUT / "transfer_robustness.png")
