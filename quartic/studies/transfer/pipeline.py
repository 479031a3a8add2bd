"""The transfer study end to end, as resumable units of :func:`quartic.harness.runs.run_sweep`.

1. pretrain a language model per (size, architecture, seed): the decoder by next-token prediction,
   the encoder by masked-token prediction; bodies cached under ``OUT/cache/pretrained``;
2. *direct*: pretrained → small target train (``target_fraction`` of the source size);
   *transfer*: pretrained → large source train → the same target train, the 2-way head carried
   over; every source → target pair of the three bias tasks (or ``pairs``), ``n_seeds`` seeds
   (seed i: pretrained body i, head init i, data order i), best checkpoint by validation loss (the
   source stage validates on a held-out slice of its own training distribution, the target stage
   on the target's validation split). Full fine-tuning at every size, and LoRA (adapters + head)
   at ``lora_size``. The read-out is each architecture's own unless ``pooling`` says otherwise,
   and with ``probe_steps`` every stage is LP-FT (the head alone on the frozen body first);
3. attack the target test set (first ``n_attack`` rows) at each budget (and unlimited), and record
   OAcc, AUA, ASR, mean queries, % words perturbed, confidence margin;
4. a linear bag-of-words baseline per task (:func:`quartic.studies.transfer.bow_logistic`) from
   its target and its source train rows, to put the transformers' clean accuracy in scale;
5. the bridge to the first paper: at the start of the target fine-tune, the AIC quantities of the
   robustness loss (:func:`quartic.studies.transfer.robustness_geometry`) for the transferred and
   the direct models.

The surface-form knob (``TaskDataConfig.surface_bias`` with ``decoy_rate``) is swept over
``settings``: ``surface`` (source positives written only in privileged forms, source negatives
carrying decoys in the other forms) and ``plain`` (no surface bias). The direct arm never sees a
source task, so it is shared by both settings. :func:`run` writes the summary of
:mod:`quartic.studies.transfer.summary`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib

import jax
import numpy as np

from quartic.core.cache import memo
from quartic.core.errors import QuarticError
from quartic.harness import checkpoint
from quartic.harness.runs import RunDir, run_sweep, write_json_atomic
from quartic.models.transformer import POOLINGS, PRESETS, count_params
from quartic.studies.transfer import baseline, bridge, evaluate, models, probe, trainer
from quartic.studies.transfer import summary as summary_
from quartic.studies.transfer.attack import AttackConfig, synonym_table
from quartic.studies.transfer.robustness_metrics import robustness_metrics
from quartic.tasks import synonyms as syn

__all__ = [
    "SETTINGS",
    "StudyConfig",
    "baseline_unit",
    "bridge_unit",
    "initial_classifiers",
    "model_cfg",
    "pretrain_unit",
    "pretrained",
    "run",
    "source_models",
    "source_unit",
    "target_unit",
    "units",
    "world",
]

#: Settings of the surface-form knob: ``surface`` uses the config's surface_bias/decoy_rate.
SETTINGS = ("surface", "plain")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The transfer study: its models, its world, its training stages, its attack and its bridge.

    The defaults are the full study: 4 sizes, both architectures, both settings at every size,
    the 3 pairs that make each task a target once, 5 seeds, full fine-tuning (146 units, 1:12:30
    on 2 cores; ``results/full/transfer_robustness_lpft_4sizes``). Every field can be overridden
    (``--set key=value``): ``sizes=...,1m pretrain_lrs=encoder_1m:1e-3`` adds the 1M preset
    (its encoder at the rate its probe sets), ``lora_size=100k``
    the LoRA arm, ``pairs=`` all 6 pairs.
    """

    # models
    sizes: tuple[str, ...] = ("2k", "7k", "30k", "100k")
    archs: tuple[str, ...] = ("decoder", "encoder")
    lora_size: str = ""  # LoRA adapters (and head) at this size too ("100k", ...); "" for none
    lora_archs: tuple[str, ...] = ("decoder",)  # the paper adapts its large decoders
    lora_rank: int = 4
    n_seeds: int = 5
    # the world: language, tasks and splits (paper-scale splits; short sentences)
    n_concepts: int = 30
    max_synonyms: int = 6
    n_stop: int = 8
    n_cues: int = 6
    n_shared: int = 3
    cue_concepts: tuple[int, ...] = ()  # explicit cue sets, n_cues per task in TASK_NAMES order
    n_source: int = 12_000
    target_fraction: float = 0.05
    n_val: int = 1_600
    n_test: int = 1_600
    min_len: int = 10
    max_len: int = 20
    label_noise: float = 0.15
    settings: tuple[str, ...] = ("surface", "plain")
    plain_sizes: tuple[str, ...] = ()  # sizes run in "plain"; empty: all
    surface_bias: float = 1.0  # of the "surface" setting ("plain" has 0 and no decoys)
    decoy_rate: float = 0.5
    # "source>target"; empty: all 6
    pairs: tuple[str, ...] = ("hate>political", "political>gender", "gender>hate")
    # training
    corpus_size: int = 20_000
    pretrain_steps: int = 2_000
    pretrain_lr: float = 3e-3
    # per-model rates replacing pretrain_lr, "ARCH_SIZE:LR" or "SIZE:LR" ("encoder_1m:1e-3"): at
    # 3e-3 the 1M encoder does not learn its language (concept probe 0.27), at 1e-3 it does (1.0;
    # benchmarks/transfer_pretrain_lr.py)
    pretrain_lrs: tuple[str, ...] = ()
    source_steps: int = 600
    source_eval_every: int = 100
    # The fine-tuning recipe (target_steps, lr, pooling, probe_steps) is LP-FT with mean pooling,
    # the one under which the 30k and 100k decoders beat word counts (docs/results.md, "Models
    # that beat word counts"; benchmarks/transfer_readout.py). The study's first recipe, whose
    # models stayed below word counts: pooling="" probe_steps=0 lr=1e-3 target_steps=200.
    target_steps: int = 400
    target_eval_every: int = 25
    batch_size: int = 32
    lr: float = 3e-4
    lora_lr: float = 3e-3
    # the classifier's read-out: "" each architecture's own (decoder: last token, encoder: mean
    # over tokens), or "mean" / "max" / "last" for both
    pooling: str = "mean"
    # LP-FT: before each fine-tuning stage (source and target, both arms), ``probe_steps`` steps
    # of the head alone on the frozen body at ``probe_lr``, then the stage from the probe's best
    # checkpoint; 0: none
    probe_steps: int = 400
    probe_lr: float = 1e-2
    n_val_eval: int = 512  # validation rows for the best checkpoint (source: held out of its train)
    # the attack
    budgets: tuple[int, ...] = (80, 500)
    unlimited: bool = True
    max_candidates: int = 20
    attack_method: str = "a2t"  # or "wir" (deletion word importance), same constraints
    n_attack: int = 300  # first rows of the target test set that are attacked
    # the bridge
    bridge_size: str = "2k"
    bridge_rank: int = 4
    bridge_iters: int = 20
    bridge_examples: int = 256
    seed: int = 0

    def __post_init__(self):
        lora = [self.lora_size] if self.lora_size else []
        for size in (*self.sizes, *self.plain_sizes, self.bridge_size, *lora):
            if size not in PRESETS:
                raise QuarticError(f"unknown model size {size!r}; choose from {list(PRESETS)}")
        if not self.sizes:
            raise QuarticError("sizes is empty: give at least one model size")
        if self.lora_size and self.lora_size not in self.sizes:
            raise QuarticError(f"lora_size={self.lora_size!r} is not one of sizes={self.sizes}")
        for arch in (*self.archs, *self.lora_archs):
            if arch not in models.ARCHS:
                raise QuarticError(
                    f"unknown architecture {arch!r}; choose from {list(models.ARCHS)}"
                )
        if not self.archs:
            raise QuarticError("archs is empty: give 'decoder', 'encoder' or both")
        for s in self.settings:
            if s not in SETTINGS:
                raise QuarticError(f"unknown setting {s!r}; choose from {SETTINGS}")
        if not self.settings:
            raise QuarticError("settings is empty: give 'surface', 'plain' or both")
        for b in self.budgets:
            if b < 1:
                raise QuarticError(
                    f"attack budget {b}: a query budget must be >= 1 (use unlimited=true for no "
                    "limit)"
                )
        if not self.budgets and not self.unlimited:
            raise QuarticError("no attack budget: give budgets or unlimited=true")
        if self.n_seeds < 1:
            raise QuarticError(f"n_seeds={self.n_seeds}: need at least 1")
        if self.n_attack < 1 or self.n_val_eval < 2 or self.bridge_examples < 2:
            raise QuarticError(
                f"n_attack={self.n_attack}, n_val_eval={self.n_val_eval}, "
                f"bridge_examples={self.bridge_examples}: need >= 1, >= 2, >= 2"
            )
        for p in self.pairs:
            s, _, t = p.partition(">")
            if s not in syn.TASK_NAMES or t not in syn.TASK_NAMES or s == t:
                raise QuarticError(
                    f"pair {p!r}: write SOURCE>TARGET with two different tasks of {syn.TASK_NAMES}"
                )
        self._pretrain_rates()  # names a bad entry
        if self.cue_concepts and len(self.cue_concepts) != len(syn.TASK_NAMES) * self.n_cues:
            raise QuarticError(
                f"cue_concepts has {len(self.cue_concepts)} entries; give n_cues={self.n_cues} "
                f"per task, {len(syn.TASK_NAMES) * self.n_cues} in all"
            )
        self.data_config("surface")  # TaskDataConfig checks the split sizes and knobs
        if self.n_val_eval >= self.n_source:
            raise QuarticError(
                f"n_val_eval={self.n_val_eval} must be below n_source={self.n_source} (the "
                "source stage validates on rows held out of its training set)"
            )
        trainer.FitConfig(
            self.pretrain_steps, self.batch_size, self.pretrain_lr, self.pretrain_steps
        )
        trainer.FitConfig(self.source_steps, self.batch_size, self.lr, self.source_eval_every)
        trainer.FitConfig(self.target_steps, self.batch_size, self.lr, self.target_eval_every)
        if self.pooling and self.pooling not in POOLINGS:
            raise QuarticError(
                f"pooling={self.pooling!r}: give one of {POOLINGS} or '' (each architecture's own)"
            )
        if self.probe_steps < 0:
            raise QuarticError(f"probe_steps={self.probe_steps}: must be >= 0 (0: no probe)")
        self.probe_fit()  # FitConfig checks the probe stage's steps and rate
        AttackConfig(max_candidates=self.max_candidates, method=self.attack_method)

    def probe_fit(self) -> trainer.FitConfig | None:
        """The LP-FT probe stage (the head alone, ``probe_steps`` at ``probe_lr``), or None."""
        if not self.probe_steps:
            return None
        return trainer.FitConfig(
            self.probe_steps, self.batch_size, self.probe_lr, _eval_every(self.probe_steps)
        )

    def data_config(self, setting: str) -> syn.TaskDataConfig:
        surface = setting == "surface"
        return syn.TaskDataConfig(
            n_source=self.n_source,
            target_fraction=self.target_fraction,
            n_val=self.n_val,
            n_test=self.n_test,
            min_len=self.min_len,
            max_len=self.max_len,
            label_noise=self.label_noise,
            surface_bias=self.surface_bias if surface else 0.0,
            decoy_rate=self.decoy_rate if surface else 0.0,
        )

    def _pretrain_rates(self) -> dict[str, float]:
        """``pretrain_lrs`` as {"ARCH_SIZE" or "SIZE": rate}; QuarticError names a bad entry."""
        rates = {}
        for entry in self.pretrain_lrs:
            model, _, rate = entry.partition(":")
            arch, _, size = model.rpartition("_")
            try:
                ok = float(rate) > 0 and size in PRESETS and arch in ("", *models.ARCHS)
            except ValueError:
                ok = False
            if not ok:
                raise QuarticError(
                    f"pretrain_lrs entry {entry!r}: write ARCH_SIZE:LR or SIZE:LR with a size of "
                    f"{list(PRESETS)}, an architecture of {list(models.ARCHS)} and a rate > 0"
                )
            rates[model] = float(rate)
        return rates

    def pretrain_lr_for(self, size: str, arch: str) -> float:
        """The pretraining rate of (size, arch): its ``pretrain_lrs`` entry ("ARCH_SIZE" before
        "SIZE"), else ``pretrain_lr``."""
        rates = self._pretrain_rates()
        return rates.get(f"{arch}_{size}", rates.get(size, self.pretrain_lr))

    def pair_list(self) -> list[tuple[str, str]]:
        if self.pairs:
            return [tuple(p.split(">")) for p in self.pairs]
        return [(s, t) for s in syn.TASK_NAMES for t in syn.TASK_NAMES if s != t]

    def budget_names(self) -> list[str]:
        return [str(b) for b in self.budgets] + (["unlimited"] if self.unlimited else [])

    def fts(self, size: str, arch: str) -> list[str]:
        lora = size == self.lora_size and arch in self.lora_archs
        return ["full", "lora"] if lora else ["full"]

    def settings_at(self, size: str) -> list[str]:
        """The knob settings run at ``size`` ("plain" only at ``plain_sizes``, if given)."""
        return [
            s
            for s in self.settings
            if s != "plain" or not self.plain_sizes or size in self.plain_sizes
        ]


# ----------------------------------------------------------------------------------------------
# The world and the models


@memo(maxsize=4)
def world(config: StudyConfig):
    """(language, tasks by name, splits by (setting, task), synonym table)."""
    lang = syn.make_language(
        syn.LanguageConfig(
            n_concepts=config.n_concepts,
            max_synonyms=config.max_synonyms,
            n_stop=config.n_stop,
            seed=config.seed,
        )
    )
    if config.cue_concepts:
        k = config.n_cues
        tasks = tuple(
            syn.BiasTask(name, tuple(config.cue_concepts[i * k : (i + 1) * k]))
            for i, name in enumerate(syn.TASK_NAMES)
        )
        for task in tasks:
            bad = [c for c in task.cue_concepts if not 0 <= c < lang.n_concepts]
            if bad:
                raise QuarticError(
                    f"task {task.name!r}: cue concepts {bad} are outside the vocabulary's "
                    f"concepts [0, {lang.n_concepts})"
                )
    else:
        tasks = syn.bias_tasks(lang, n_cues=config.n_cues, n_shared=config.n_shared)
    by_name = {t.name: t for t in tasks}
    splits = {
        (setting, t.name): syn.make_task_splits(lang, t, config.data_config(setting), config.seed)
        for setting in config.settings
        for t in tasks
    }
    table = synonym_table(lang.candidates, lang.is_content, lang.is_word)
    return lang, by_name, splits, table


def model_cfg(
    config: StudyConfig, size: str, arch: str, head: str = "classifier", lora: bool = False
):
    """The TransformerConfig of (size, arch) in this study's language: the classifier (with LoRA
    adapters if ``lora``) or the language model (``head="lm"``)."""
    lang = world(config)[0]
    return models.model_config(
        size,
        arch,
        vocab_size=lang.vocab_size,
        seq_len=config.max_len,
        head=head,
        lora_rank=config.lora_rank if lora else 0,
        pooling=config.pooling or None,
    )


def _keys(config: StudyConfig, *parts) -> jax.Array:
    """``[n_seeds, 2]`` training keys, one per seed, derived from the unit's identity."""
    tag = zlib.crc32("/".join(map(str, parts)).encode())
    return jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(config.seed), tag), config.n_seeds
    )


def _cache_dir(out_dir: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(out_dir) / "cache"


def _cached(out_dir, kind: str, name: str, cfg, compute) -> tuple[list[dict], dict]:
    """``n_seeds`` models and their info from the checkpoint ``cache/<kind>/<name>/`` (the seeds
    stacked, :func:`quartic.studies.transfer.save_params`) if it is complete, else from
    ``compute() -> (params stacked, info)``, then saved."""
    path = _cache_dir(out_dir) / kind / name
    if checkpoint.exists(path):
        stacked, info = models.load_params(path, cfg)
    else:
        stacked, info = compute()
        models.save_params(path, cfg, stacked, info)
    return models.unstack(stacked), info


def _initial_lms(config: StudyConfig, lm) -> list[dict]:
    return [models.init_params(lm, 100 + i) for i in range(config.n_seeds)]


def pretrained(
    config: StudyConfig, out_dir, size: str, arch: str, mask_rate: float | None = None
) -> tuple[list[dict], dict]:
    """The pretrained language models of (size, arch), one per seed (cached on disk).
    ``mask_rate`` (encoders) replaces the masked-token objective's default rate (``FitConfig``'s)
    and caches the models under their own name; the study itself uses the default."""
    lm = model_cfg(config, size, arch, head="lm")
    if mask_rate is not None and arch != "encoder":
        raise QuarticError(f"mask_rate is for the masked-token (encoder) pretraining, not {arch!r}")

    def compute():
        lang = world(config)[0]
        corpus = syn.pretrain_corpus(lang, config.corpus_size, config.max_len, config.seed)
        held_out = syn.pretrain_corpus(lang, 256, config.max_len, config.seed + 1)
        init = models.stack(_initial_lms(config, lm))
        fc = trainer.FitConfig(
            config.pretrain_steps,
            config.batch_size,
            config.pretrain_lr_for(size, arch),
            _eval_every(config.pretrain_steps),
            **({} if mask_rate is None else {"mask_rate": mask_rate}),
        )
        objective = "lm" if arch == "decoder" else "mlm"
        res = trainer.fit(
            objective, lm, init, {"tokens": corpus}, {"tokens": held_out},
            _keys(config, "pretrain", size, arch), fc, desc=f"pretrain {arch} {size}",
        )  # fmt: skip
        info = {"objective": objective, "val_curve": res.val_curve.tolist()}
        return res.params, info

    name = f"{arch}_{size}" + ("" if mask_rate is None else f"_mask{mask_rate:g}")
    return _cached(out_dir, "pretrained", name, lm, compute)


def initial_classifiers(config: StudyConfig, out_dir, size: str, arch: str, ft: str) -> dict:
    """Stacked ``[n_seeds]`` classifiers at the start of fine-tuning: pretrained body i, fresh
    head (and adapters) from seed i. Both arms start here."""
    clf = model_cfg(config, size, arch, lora=ft == "lora")
    bodies, _ = pretrained(config, out_dir, size, arch)
    return models.stack(
        [models.carry_body(models.init_params(clf, 1000 + i), b) for i, b in enumerate(bodies)]
    )


def _eval_every(steps: int) -> int:
    return steps // 4 if steps % 4 == 0 else steps


def _lr(config: StudyConfig, ft: str) -> float:
    return config.lora_lr if ft == "lora" else config.lr


def _fine_tune(
    config: StudyConfig, clf, start: dict, train: dict, val: dict, fc, ft: str, unit: tuple, desc
) -> trainer.FitResult:
    """One fine-tuning stage of ``unit`` (the parts that name its keys): with ``probe_steps``, a
    linear probe first (the head alone on the frozen body, ``probe_lr``; its own keys), then the
    stage from the probe's best checkpoint (LP-FT). Without, the stage alone, as it always was."""
    pc = config.probe_fit()
    if pc is not None:
        start = trainer.fit(
            "clf", clf, start, train, val, _keys(config, "probe", *unit), pc, trainable="head",
            desc=f"{desc} probe",
        ).params  # fmt: skip
    return trainer.fit(
        "clf", clf, start, train, val, _keys(config, *unit), fc, trainable=ft, desc=desc
    )


def source_models(
    config: StudyConfig, out_dir, setting: str, size: str, arch: str, ft: str, source
):
    """The models fine-tuned on ``source`` (one per seed, cached on disk)."""
    clf = model_cfg(config, size, arch, lora=ft == "lora")

    def compute():
        split = world(config)[2][(setting, source)].source_train
        n_hold = config.n_val_eval
        train = {k: v[:-n_hold] for k, v in split.items()}
        val = {k: v[-n_hold:] for k, v in split.items()}
        fc = trainer.FitConfig(
            config.source_steps, config.batch_size, _lr(config, ft), config.source_eval_every
        )
        res = _fine_tune(
            config, clf, initial_classifiers(config, out_dir, size, arch, ft), train, val, fc, ft,
            ("source", setting, size, arch, ft, source), f"source {source} {arch} {size} {ft}",
        )  # fmt: skip
        own_test = world(config)[2][(setting, source)].test
        probs = trainer.predict(
            model_cfg(config, size, arch), _eval_params(res.params, ft), own_test["tokens"]
        )
        info = {
            "best_val_loss": res.best_val_loss.tolist(),
            "best_step": res.best_step.tolist(),
            "val_curve": res.val_curve.tolist(),
            # the source task's own (unbiased) test split: how much the surface bias cost it
            "source_test_accuracy": _accuracy(probs, own_test["labels"]).tolist(),
        }
        return res.params, info

    name = f"{setting}_{arch}_{size}_{ft}_{source}"
    return _cached(out_dir, "source", name, clf, compute)


def _eval_params(stacked: dict, ft: str) -> dict:
    return models.merge_lora(stacked) if ft == "lora" else stacked


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (probs.argmax(-1) == np.asarray(labels)[None, :]).mean(axis=1)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Units


def target_unit(config: StudyConfig, out_dir, setting, size, arch, ft, target, source=None) -> dict:
    """Fine-tune on ``target`` (from the pretrained model, or from the ``source`` models), then
    evaluate and attack the target test set; one record per seed."""
    lang, _, splits, table = world(config)
    split = splits[(setting, target)]
    clf = model_cfg(config, size, arch, lora=ft == "lora")
    if source is None:
        start = initial_classifiers(config, out_dir, size, arch, ft)
    else:
        start = models.stack(source_models(config, out_dir, setting, size, arch, ft, source)[0])
    val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
    fc = trainer.FitConfig(
        config.target_steps, config.batch_size, _lr(config, ft), config.target_eval_every
    )
    arm = "direct" if source is None else f"transfer_{source}"
    res = _fine_tune(
        config, clf, start, split.target_train, val, fc, ft,
        ("target", setting, size, arch, ft, target, arm), f"target {target} ({arm}) {arch} {size} {ft}",
    )  # fmt: skip
    base = model_cfg(config, size, arch)
    params = _eval_params(res.params, ft)
    test_acc = _accuracy(trainer.predict(base, params, split.test["tokens"]), split.test["labels"])
    attacked = {k: v[: config.n_attack] for k, v in split.test.items()}
    n_cand = min(config.max_candidates, lang.candidates.shape[1])
    # A budget that can never bind gives exactly the unlimited attack: run that once.
    effective = {
        name: None
        if name == "unlimited"
        or evaluate.budget_is_unlimited(int(name), config.max_len, n_cand, config.attack_method)
        else int(name)
        for name in config.budget_names()
    }
    runs = {}
    for budget in dict.fromkeys(effective.values()):
        ac = AttackConfig(
            max_candidates=config.max_candidates,
            query_budget=budget,
            method=config.attack_method,
            mask_token=syn.PAD,
        )
        results = evaluate.attack_models(base, params, attacked, table, ac, batch_size=512)
        runs[budget] = [robustness_metrics(r).as_dict() for r in results]
    attacks = {
        name: [
            {**m, "identical_to_unlimited": budget is None and name != "unlimited"}
            for m in runs[budget]
        ]
        for name, budget in effective.items()
    }
    per_seed = [
        {
            "seed": i,
            "best_val_loss": float(res.best_val_loss[i]),
            "best_step": int(res.best_step[i]),
            "test_accuracy": float(test_acc[i]),
            "attacks": {b: attacks[b][i] for b in config.budget_names()},
        }
        for i in range(config.n_seeds)
    ]
    return _finite_or_none(
        {
            "kind": "target",
            "setting": setting,
            "size": size,
            "arch": arch,
            "ft": ft,
            "arm": "direct" if source is None else "transfer",
            "source": source,
            "target": target,
            "n_params": count_params(clf),
            "n_trainable": models.n_trainable(clf, ft),
            "per_seed": per_seed,
        }
    )


def task_probes(config: StudyConfig, bodies: list[dict], initial: list[dict], size, arch) -> dict:
    """:func:`quartic.studies.transfer.probe.task_probe` of the pretrained ``bodies`` and of the
    ``initial`` ones, per ``"setting|target"`` of the study's pairs: a linear probe of the
    classifier's pooled features from the target training rows (the direct arm's data; L2 chosen
    on ``n_val_eval`` validation rows), test accuracy per seed and mean."""
    clf = model_cfg(config, size, arch)
    fresh = [models.init_params(clf, 1000 + i) for i in range(len(bodies))]
    arms = {
        arm: [models.carry_body(f, b) for f, b in zip(fresh, plist, strict=True)]
        for arm, plist in (("pretrained", bodies), ("init", initial))
    }
    splits = world(config)[2]
    out = {}
    for setting in config.settings:
        for name in sorted({t for _, t in config.pair_list()}):
            split = splits[(setting, name)]
            data = {"train": split.target_train, "test": split.test,
                    "val": {k: v[: config.n_val_eval] for k, v in split.val.items()}}  # fmt: skip
            out[f"{setting}|{name}"] = {a: probe.task_probe(clf, p, data) for a, p in arms.items()}
    return out


def pretrain_unit(config: StudyConfig, out_dir, size: str, arch: str) -> dict:
    bodies, info = pretrained(config, out_dir, size, arch)
    lm = model_cfg(config, size, arch, head="lm")
    initial = _initial_lms(config, lm)
    found = probe.probe_models(bodies, initial, world(config)[0])
    tasks = task_probes(config, bodies, initial, size, arch)
    return {"kind": "pretrain", "size": size, "arch": arch, "n_params_lm": count_params(lm),
            "probe": found, "task_probe": tasks, **info}  # fmt: skip


def source_unit(config: StudyConfig, out_dir, setting, size, arch, ft, source) -> dict:
    _, info = source_models(config, out_dir, setting, size, arch, ft, source)
    return {"kind": "source", "setting": setting, "size": size, "arch": arch, "ft": ft,
            "source": source, **info}  # fmt: skip


def bridge_unit(config: StudyConfig, out_dir, setting: str, arch: str, target: str) -> dict:
    """AIC quantities of the robustness loss at the start of the target fine-tune: the direct
    models (pretrained body + fresh head) and the transferred ones (after each source)."""
    lang, _, splits, _ = world(config)
    split = splits[(setting, target)]
    size = config.bridge_size
    n = min(config.bridge_examples, split.val["tokens"].shape[0])
    clean = {k: v[:n] for k, v in split.val.items()}
    robust = {
        "tokens": bridge.synonym_rewrite(lang, clean["tokens"], seed=config.seed),
        "labels": clean["labels"],
    }
    base = model_cfg(config, size, arch)
    starts = {"direct": initial_classifiers(config, out_dir, size, arch, "full")}
    for s, t in config.pair_list():
        if t == target:
            starts[s] = models.stack(
                source_models(config, out_dir, setting, size, arch, "full", s)[0]
            )
    out = {}
    for name, params in starts.items():
        geo = bridge.robustness_geometry(
            base, params, robust, clean, split.target_train,
            rank=config.bridge_rank, num_iters=config.bridge_iters, seed=config.seed,
        )  # fmt: skip
        out[name] = {k: v.tolist() for k, v in geo.items()}
    return {"kind": "bridge", "setting": setting, "size": size, "arch": arch, "target": target,
            "models": out}  # fmt: skip


def baseline_unit(config: StudyConfig, setting: str, task: str) -> dict:
    """A linear bag-of-words baseline (:func:`quartic.studies.transfer.bow_logistic`) on ``task``: fitted
    on its target train rows (what the direct arm sees) and on its source train rows (the source
    stage's amount and distribution of data), both scored on its test split."""
    lang, _, splits, _ = world(config)
    split = splits[(setting, task)]
    val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
    out = {"kind": "baseline", "setting": setting, "task": task}
    for rows in ("target_train", "source_train"):
        fit = baseline.bow_logistic(getattr(split, rows), val, split.test, lang.vocab_size)
        out[rows] = {
            "n_rows": int(len(getattr(split, rows)["labels"])),
            "test_accuracy": fit.test_accuracy,
            "val_accuracy": fit.val_accuracy,
            "l2": fit.l2,
            "grad_norm": fit.grad_norm,
        }
    return out


def units(config: StudyConfig, out_dir):
    units = []
    pairs = config.pair_list()
    sources = sorted({s for s, _ in pairs})
    targets = sorted({t for _, t in pairs})
    for setting in config.settings:
        for task in sorted({*sources, *targets}):
            units.append(
                (
                    f"baseline__{setting}__{task}",
                    lambda g=setting, t=task: baseline_unit(config, g, t),
                )
            )
    for arch in config.archs:
        for size in config.sizes:
            units.append(
                (
                    f"pretrain__{arch}__{size}",
                    lambda a=arch, z=size: pretrain_unit(config, out_dir, z, a),
                )
            )
            for ft in config.fts(size, arch):
                ident = f"{arch}__{size}__{ft}"
                for t in targets:
                    units.append((
                        f"direct__{ident}__{t}",
                        lambda a=arch, z=size, f=ft, t=t: target_unit(config, out_dir, config.settings[0], z, a, f, t),
                    ))  # fmt: skip
                for setting in config.settings_at(size):
                    for s in sources:
                        units.append((
                            f"source__{setting}__{ident}__{s}",
                            lambda g=setting, a=arch, z=size, f=ft, s=s: source_unit(config, out_dir, g, z, a, f, s),
                        ))  # fmt: skip
                    for s, t in pairs:
                        units.append((
                            f"transfer__{setting}__{ident}__{s}-{t}",
                            lambda g=setting, a=arch, z=size, f=ft, s=s, t=t: target_unit(config, out_dir, g, z, a, f, t, s),
                        ))  # fmt: skip
            if size == config.bridge_size:
                for setting in config.settings_at(size):
                    for t in targets:
                        units.append((
                            f"bridge__{setting}__{arch}__{t}",
                            lambda g=setting, a=arch, t=t: bridge_unit(config, out_dir, g, a, t),
                        ))  # fmt: skip
    return units


def run(config: StudyConfig, out_dir, extra: dict | None = None) -> dict:
    """Every unit of the study (resuming the finished ones), then its summary with ``extra``
    merged in, written to ``out_dir/summary.json``."""
    out_dir = pathlib.Path(out_dir)
    RunDir(out_dir).write_config(config)
    world(config)  # bad cue sets and split sizes fail here, before any work
    sweep = run_sweep(units(config, out_dir), out_dir, desc="transfer_robustness")
    summary = summary_.summarise_run(config, sweep)
    summary.update(extra or {})
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
