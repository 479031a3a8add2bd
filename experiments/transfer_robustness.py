"""Transfer learning and adversarial robustness: the companion paper in miniature (issue 5).

docs/theory.md §5 (Turbal et al., arXiv:2501.00066) at small scale, end to end on the project's own
transformers and the synthetic synonym language (``quartic.tasks.synonyms``):

1. pretrain a language model per (size, architecture, seed): the decoder by next-token prediction,
   the encoder by masked-token prediction (``quartic.studies.transfer``); bodies cached under
   ``OUT/cache/pretrained``;
2. *direct*: pretrained → small target train (5 % of the source size); *transfer*: pretrained →
   large source train → the same target train, the 2-way head carried over; all 6 source → target
   pairs of the three bias tasks, ``n_seeds`` seeds (seed i: pretrained body i, head init i, data
   order i), best checkpoint by validation loss (the source stage validates on a held-out slice of
   its own training distribution, the target stage on the target's validation split). Full
   fine-tuning at every size, and LoRA (adapters + head) at ``lora_size``;
3. attack the target test set (first ``n_attack`` rows) with the A2T attack at each budget (and
   unlimited), and record OAcc, AUA, ASR, mean queries, % words perturbed, confidence margin;
   ΔOAcc and ΔASR = transfer − direct per pair, per size, per architecture, mean ± std over seeds;
4. a linear bag-of-words baseline per task (logistic regression, exact fit) from its target and
   its source train rows, to put the transformers' clean accuracy in scale;
5. the bridge to the first paper: at the start of the target fine-tune, the AIC quantities of the
   robustness loss (cross-entropy on synonym-rewritten target examples) for the transferred and the
   direct models, and their Spearman correlation with ΔASR over the pairs.

The surface-form knob (``TaskDataConfig.surface_bias`` with ``decoy_rate``) is swept over
``settings``: ``surface`` (source positives written only in privileged forms, source negatives
carrying decoys in the other forms) and ``plain`` (no surface bias). The direct arm never sees a
source task, so it is shared by both settings.

    quartic run transfer_robustness --quick   # 4.7 min on a shared 2-core CPU (2 sizes, 1 setting)
    quartic run transfer_robustness           # 39 min on a shared 2-core CPU (load ≈ 3), 188 units
    -> ΔOAcc and ΔASR (points) per size and architecture beside the paper's GPT-2 number
       (+3.67 accuracy, +20.4 ASR), whether they rise/shrink with size, and the bridge's Spearman ρ
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import zlib
from functools import cache

import jax
import numpy as np
from matplotlib.ticker import NullFormatter

from quartic.core.errors import QuarticError
from quartic.harness import checkpoint, plotting
from quartic.harness.runs import RunDir, read_json, run_sweep, write_json_atomic
from quartic.models.transformer import PRESETS, count_params
from quartic.studies import transfer as tr
from quartic.studies.attack import AttackConfig, synonym_table
from quartic.studies.collapse import spearman
from quartic.studies.robustness_metrics import robustness_metrics
from quartic.tasks import synonyms as syn

TITLE = "Transfer learning vs adversarial robustness (ΔOAcc, ΔASR by model size) and the AIC bridge"
QUICK_SECONDS = 300

#: The paper's one number: GPT-2 on hate speech, transfer − direct, in points.
PAPER = {"delta_oacc": 3.67, "delta_asr": 20.4}

#: Settings of the surface-form knob: name -> (use the config's surface_bias/decoy_rate?).
SETTINGS = ("surface", "plain")


@dataclasses.dataclass(frozen=True)
class Config:
    # models
    sizes: tuple[str, ...] = ("2k", "7k", "30k", "100k")
    archs: tuple[str, ...] = ("decoder", "encoder")
    lora_size: str = "100k"  # LoRA adapters (and head) at this size too; "" for none
    lora_archs: tuple[str, ...] = ("decoder",)  # the paper adapts its large decoders
    lora_rank: int = 4
    n_seeds: int = 3
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
    plain_sizes: tuple[str, ...] = ("2k", "7k", "30k")  # sizes run in "plain"; empty: all
    surface_bias: float = 1.0  # of the "surface" setting ("plain" has 0 and no decoys)
    decoy_rate: float = 0.5
    pairs: tuple[str, ...] = ()  # "hate>political", ...; empty: all 6
    # training
    corpus_size: int = 20_000
    pretrain_steps: int = 2_000
    pretrain_lr: float = 3e-3
    source_steps: int = 600
    source_eval_every: int = 100
    target_steps: int = 200
    target_eval_every: int = 25
    batch_size: int = 32
    lr: float = 1e-3
    lora_lr: float = 3e-3
    n_val_eval: int = 512  # validation rows for the best checkpoint (source: held out of its train)
    # the attack
    budgets: tuple[int, ...] = (80, 500)
    unlimited: bool = True
    max_candidates: int = 20
    n_attack: int = 300  # first rows of the target test set that are attacked
    # the bridge
    bridge_size: str = "2k"
    bridge_rank: int = 4
    bridge_iters: int = 20
    bridge_examples: int = 256
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            sizes=("2k", "30k"),
            lora_size="2k",
            lora_archs=("decoder", "encoder"),
            n_source=1_600,
            n_val=200,
            n_test=200,
            settings=("surface",),
            pairs=("hate>political", "political>gender", "gender>hate"),
            corpus_size=4_000,
            pretrain_steps=600,
            source_steps=300,
            source_eval_every=100,
            target_steps=150,
            target_eval_every=25,
            n_val_eval=200,
            n_attack=200,
            bridge_examples=128,
        )

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
            if arch not in tr.ARCHS:
                raise QuarticError(f"unknown architecture {arch!r}; choose from {list(tr.ARCHS)}")
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
        tr.FitConfig(self.pretrain_steps, self.batch_size, self.pretrain_lr, self.pretrain_steps)
        tr.FitConfig(self.source_steps, self.batch_size, self.lr, self.source_eval_every)
        tr.FitConfig(self.target_steps, self.batch_size, self.lr, self.target_eval_every)

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


@cache
def world(config: Config):
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


def _cfg(config: Config, size: str, arch: str, head: str = "classifier", lora: bool = False):
    lang = world(config)[0]
    return tr.model_config(
        size,
        arch,
        vocab_size=lang.vocab_size,
        seq_len=config.max_len,
        head=head,
        lora_rank=config.lora_rank if lora else 0,
    )


def _keys(config: Config, *parts) -> jax.Array:
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
        stacked, info = tr.load_params(path, cfg)
    else:
        stacked, info = compute()
        tr.save_params(path, cfg, stacked, info)
    return tr.unstack(stacked), info


def pretrained(config: Config, out_dir, size: str, arch: str) -> tuple[list[dict], dict]:
    """The pretrained language models of (size, arch), one per seed (cached on disk)."""
    lm = _cfg(config, size, arch, head="lm")

    def compute():
        lang = world(config)[0]
        corpus = syn.pretrain_corpus(lang, config.corpus_size, config.max_len, config.seed)
        held_out = syn.pretrain_corpus(lang, 256, config.max_len, config.seed + 1)
        init = tr.stack([tr.init_params(lm, 100 + i) for i in range(config.n_seeds)])
        fc = tr.FitConfig(
            config.pretrain_steps,
            config.batch_size,
            config.pretrain_lr,
            _eval_every(config.pretrain_steps),
        )
        objective = "lm" if arch == "decoder" else "mlm"
        res = tr.fit(
            objective, lm, init, {"tokens": corpus}, {"tokens": held_out},
            _keys(config, "pretrain", size, arch), fc, desc=f"pretrain {arch} {size}",
        )  # fmt: skip
        info = {"objective": objective, "val_curve": res.val_curve.tolist()}
        return res.params, info

    return _cached(out_dir, "pretrained", f"{arch}_{size}", lm, compute)


def initial_classifiers(config: Config, out_dir, size: str, arch: str, ft: str) -> dict:
    """Stacked ``[n_seeds]`` classifiers at the start of fine-tuning: pretrained body i, fresh
    head (and adapters) from seed i. Both arms start here."""
    clf = _cfg(config, size, arch, lora=ft == "lora")
    bodies, _ = pretrained(config, out_dir, size, arch)
    return tr.stack([tr.carry_body(tr.init_params(clf, 1000 + i), b) for i, b in enumerate(bodies)])


def _eval_every(steps: int) -> int:
    return steps // 4 if steps % 4 == 0 else steps


def _lr(config: Config, ft: str) -> float:
    return config.lora_lr if ft == "lora" else config.lr


def source_models(config: Config, out_dir, setting: str, size: str, arch: str, ft: str, source):
    """The models fine-tuned on ``source`` (one per seed, cached on disk)."""
    clf = _cfg(config, size, arch, lora=ft == "lora")

    def compute():
        split = world(config)[2][(setting, source)].source_train
        n_hold = config.n_val_eval
        train = {k: v[:-n_hold] for k, v in split.items()}
        val = {k: v[-n_hold:] for k, v in split.items()}
        fc = tr.FitConfig(
            config.source_steps, config.batch_size, _lr(config, ft), config.source_eval_every
        )
        res = tr.fit(
            "clf", clf, initial_classifiers(config, out_dir, size, arch, ft), train, val,
            _keys(config, "source", setting, size, arch, ft, source), fc, trainable=ft,
            desc=f"source {source} {arch} {size} {ft}",
        )  # fmt: skip
        own_test = world(config)[2][(setting, source)].test
        probs = tr.predict(
            _cfg(config, size, arch), _eval_params(res.params, ft), own_test["tokens"]
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
    return tr.merge_lora(stacked) if ft == "lora" else stacked


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


def target_unit(config: Config, out_dir, setting, size, arch, ft, target, source=None) -> dict:
    """Fine-tune on ``target`` (from the pretrained model, or from the ``source`` models), then
    evaluate and attack the target test set; one record per seed."""
    lang, _, splits, table = world(config)
    split = splits[(setting, target)]
    clf = _cfg(config, size, arch, lora=ft == "lora")
    if source is None:
        start = initial_classifiers(config, out_dir, size, arch, ft)
    else:
        start = tr.stack(source_models(config, out_dir, setting, size, arch, ft, source)[0])
    val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
    fc = tr.FitConfig(
        config.target_steps, config.batch_size, _lr(config, ft), config.target_eval_every
    )
    arm = "direct" if source is None else f"transfer_{source}"
    res = tr.fit(
        "clf", clf, start, split.target_train, val,
        _keys(config, "target", setting, size, arch, ft, target, arm), fc, trainable=ft,
        desc=f"target {target} ({arm}) {arch} {size} {ft}",
    )  # fmt: skip
    base = _cfg(config, size, arch)
    params = _eval_params(res.params, ft)
    test_acc = _accuracy(tr.predict(base, params, split.test["tokens"]), split.test["labels"])
    attacked = {k: v[: config.n_attack] for k, v in split.test.items()}
    n_cand = min(config.max_candidates, lang.candidates.shape[1])
    # A budget that can never bind gives exactly the unlimited attack: run that once.
    effective = {
        name: None
        if name == "unlimited" or tr.budget_is_unlimited(int(name), config.max_len, n_cand)
        else int(name)
        for name in config.budget_names()
    }
    runs = {}
    for budget in dict.fromkeys(effective.values()):
        ac = AttackConfig(max_candidates=config.max_candidates, query_budget=budget)
        results = tr.attack_models(base, params, attacked, table, ac, batch_size=512)
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
            "n_trainable": _n_trainable(clf, ft),
            "per_seed": per_seed,
        }
    )


def _n_trainable(cfg, ft: str) -> int:
    if ft == "full":
        return count_params(cfg)
    d, f, r, L = cfg.d_model, cfg.d_ff, cfg.lora_rank, cfg.n_layers
    head = d * cfg.n_classes + cfg.n_classes
    return L * (2 * (d * r + r * d) + (d * r + r * f) + (f * r + r * d)) + head


def pretrain_unit(config: Config, out_dir, size: str, arch: str) -> dict:
    _, info = pretrained(config, out_dir, size, arch)
    lm = _cfg(config, size, arch, head="lm")
    return {"kind": "pretrain", "size": size, "arch": arch, "n_params_lm": count_params(lm), **info}


def source_unit(config: Config, out_dir, setting, size, arch, ft, source) -> dict:
    _, info = source_models(config, out_dir, setting, size, arch, ft, source)
    return {"kind": "source", "setting": setting, "size": size, "arch": arch, "ft": ft,
            "source": source, **info}  # fmt: skip


def bridge_unit(config: Config, out_dir, setting: str, arch: str, target: str) -> dict:
    """AIC quantities of the robustness loss at the start of the target fine-tune: the direct
    models (pretrained body + fresh head) and the transferred ones (after each source)."""
    lang, _, splits, _ = world(config)
    split = splits[(setting, target)]
    size = config.bridge_size
    n = min(config.bridge_examples, split.val["tokens"].shape[0])
    clean = {k: v[:n] for k, v in split.val.items()}
    robust = {
        "tokens": tr.synonym_rewrite(lang, clean["tokens"], seed=config.seed),
        "labels": clean["labels"],
    }
    base = _cfg(config, size, arch)
    starts = {"direct": initial_classifiers(config, out_dir, size, arch, "full")}
    for s, t in config.pair_list():
        if t == target:
            starts[s] = tr.stack(source_models(config, out_dir, setting, size, arch, "full", s)[0])
    out = {}
    for name, params in starts.items():
        geo = tr.robustness_geometry(
            base, params, robust, clean, split.target_train,
            rank=config.bridge_rank, num_iters=config.bridge_iters, seed=config.seed,
        )  # fmt: skip
        out[name] = {k: v.tolist() for k, v in geo.items()}
    return {"kind": "bridge", "setting": setting, "size": size, "arch": arch, "target": target,
            "models": out}  # fmt: skip


def baseline_unit(config: Config, setting: str, task: str) -> dict:
    """A linear bag-of-words baseline (:func:`quartic.studies.transfer.bow_logistic`) on ``task``: fitted
    on its target train rows (what the direct arm sees) and on its source train rows (the source
    stage's amount and distribution of data), both scored on its test split."""
    lang, _, splits, _ = world(config)
    split = splits[(setting, task)]
    val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
    out = {"kind": "baseline", "setting": setting, "task": task}
    for rows in ("target_train", "source_train"):
        fit = tr.bow_logistic(getattr(split, rows), val, split.test, lang.vocab_size)
        out[rows] = {
            "n_rows": int(len(getattr(split, rows)["labels"])),
            "test_accuracy": fit.test_accuracy,
            "val_accuracy": fit.val_accuracy,
            "l2": fit.l2,
            "grad_norm": fit.grad_norm,
        }
    return out


def _units(config: Config, out_dir):
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


# ----------------------------------------------------------------------------------------------
# Summary


def _mean_std(values) -> dict:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}  # fmt: skip


def _delta(a, b):
    return None if a is None or b is None else 100.0 * (a - b)


def summarise(config: Config, res: dict) -> dict:
    """ΔOAcc and ΔASR (transfer − direct, points) per (setting, arch, size, ft) and pair."""
    direct = {
        (r["arch"], r["size"], r["ft"], r["target"]): r
        for r in res.values()
        if r.get("kind") == "target" and r["arm"] == "direct"
    }
    cells: dict = {}
    for r in res.values():
        if r.get("kind") != "target" or r["arm"] != "transfer":
            continue
        d = direct.get((r["arch"], r["size"], r["ft"], r["target"]))
        if d is None:
            continue
        key = f"{r['setting']}|{r['arch']}|{r['size']}|{r['ft']}"
        cell = cells.setdefault(
            key,
            {"setting": r["setting"], "arch": r["arch"], "size": r["size"], "ft": r["ft"],
             "n_params": r["n_params"], "n_trainable": r["n_trainable"], "pairs": {}},
        )  # fmt: skip
        pair = {"delta_oacc": [], "oacc_transfer": [], "oacc_direct": []}
        for b in config.budget_names():
            pair[f"delta_asr_{b}"] = []
            pair[f"asr_transfer_{b}"] = []
            pair[f"asr_direct_{b}"] = []
        for st, sd in zip(r["per_seed"], d["per_seed"], strict=True):
            pair["delta_oacc"].append(_delta(st["test_accuracy"], sd["test_accuracy"]))
            pair["oacc_transfer"].append(st["test_accuracy"])
            pair["oacc_direct"].append(sd["test_accuracy"])
            for b in config.budget_names():
                at, ad = st["attacks"][b], sd["attacks"][b]
                pair[f"delta_asr_{b}"].append(
                    _delta(at["attack_success_rate"], ad["attack_success_rate"])
                )
                pair[f"asr_transfer_{b}"].append(at["attack_success_rate"])
                pair[f"asr_direct_{b}"].append(ad["attack_success_rate"])
        cell["pairs"][f"{r['source']}>{r['target']}"] = pair
    for cell in cells.values():
        # Per seed, the mean over pairs; then mean ± std over seeds.
        keys = next(iter(cell["pairs"].values())).keys()
        for k in keys:
            per_seed = []
            for i in range(config.n_seeds):
                vals = [p[k][i] for p in cell["pairs"].values() if p[k][i] is not None]
                per_seed.append(float(np.mean(vals)) if vals else None)
            cell[k] = {**_mean_std(per_seed), "per_seed": per_seed}
        for p in cell["pairs"].values():
            for k in list(p):
                p[k] = {**_mean_std(p[k]), "per_seed": p[k]}
    claims = _claims(config, cells)
    return {"cells": cells, "claims": claims}


def _claims(config: Config, cells: dict) -> dict:
    """Per setting and arch (full fine-tuning): the sign of ΔASR at each size, and the trend of
    ΔASR against log10(params) (least-squares slope and Spearman ρ over sizes)."""
    out = {}
    b = config.budget_names()[0]
    for setting in config.settings:
        for arch in config.archs:
            rows = sorted(
                (c for c in cells.values()
                 if c["setting"] == setting and c["arch"] == arch and c["ft"] == "full"
                 and c[f"delta_asr_{b}"]["mean"] is not None),
                key=lambda c: c["n_params"],
            )  # fmt: skip
            if not rows:
                continue
            x = np.log10([c["n_params"] for c in rows])
            y = np.array([c[f"delta_asr_{b}"]["mean"] for c in rows])
            acc = np.array([c["delta_oacc"]["mean"] for c in rows])
            slope = float(np.polyfit(x, y, 1)[0]) if len(rows) > 1 else None
            out[f"{setting}|{arch}"] = {
                "budget": b,
                "sizes": [c["size"] for c in rows],
                "delta_asr": y.tolist(),
                "delta_asr_std": [c[f"delta_asr_{b}"]["std"] for c in rows],
                "delta_oacc": acc.tolist(),
                "n_sizes_asr_up": int((y > 0).sum()),
                "n_sizes_oacc_up": int((acc > 0).sum()),
                "slope_per_decade": slope,
                "spearman_size": spearman(x, y) if len(rows) > 2 else None,
                "transfer_raises_asr": bool((y > 0).all()),
                "rise_shrinks_with_size": bool(slope is not None and slope < 0 and y[0] > 0),
            }
    return out


BRIDGE_QUANTITIES = ("lambda_max", "overlap", "gamma_fisher", "linear_rate", "robust_loss")


def summarise_bridge(config: Config, res: dict, cells: dict) -> dict:
    """Transfer − direct of each AIC quantity per pair and seed, and its Spearman ρ with ΔASR."""
    out = {}
    b = config.budget_names()[0]
    for setting in config.settings:
        for arch in config.archs:
            cell = cells.get(f"{setting}|{arch}|{config.bridge_size}|full")
            units = [
                r for r in res.values()
                if r.get("kind") == "bridge" and r["setting"] == setting and r["arch"] == arch
            ]  # fmt: skip
            if not units or cell is None:
                continue
            rec: dict = {"size": config.bridge_size, "per_pair": {}, "spearman_pairs": {},
                         "spearman_seeds": {}}  # fmt: skip
            for u in units:
                d = u["models"]["direct"]
                for s, m in u["models"].items():
                    if s == "direct":
                        continue
                    pair = f"{s}>{u['target']}"
                    if pair not in cell["pairs"]:
                        continue
                    rec["per_pair"][pair] = {
                        "delta_asr": cell["pairs"][pair][f"delta_asr_{b}"]["per_seed"],
                        **{
                            q: [mt - dt for mt, dt in zip(m[q], d[q], strict=True)]
                            for q in BRIDGE_QUANTITIES
                        },
                        "transfer": {q: m[q] for q in BRIDGE_QUANTITIES},
                        "direct": {q: d[q] for q in BRIDGE_QUANTITIES},
                    }
            pairs = rec["per_pair"].values()
            for q in BRIDGE_QUANTITIES:
                xs = [np.mean(p[q]) for p in pairs]
                ys = [np.mean([v for v in p["delta_asr"] if v is not None]) for p in pairs]
                rec["spearman_pairs"][q] = spearman(xs, ys) if len(xs) > 2 else None
                xs = [v for p in pairs for v, a in zip(p[q], p["delta_asr"], strict=True)
                      if a is not None]  # fmt: skip
                ys = [a for p in pairs for a in p["delta_asr"] if a is not None]
                rec["spearman_seeds"][q] = spearman(xs, ys) if len(xs) > 2 else None
                rec[f"mean_delta_{q}"] = float(np.mean([np.mean(p[q]) for p in pairs]))
                rec[f"mean_direct_{q}"] = float(np.mean([np.mean(p["direct"][q]) for p in pairs]))
                rec[f"mean_transfer_{q}"] = float(
                    np.mean([np.mean(p["transfer"][q]) for p in pairs])
                )
            out[f"{setting}|{arch}"] = rec
    return out


def run(config: Config, out_dir: pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    RunDir(out_dir).write_config(config)
    world(config)  # bad cue sets and split sizes fail here, before any work
    sweep = run_sweep(_units(config, out_dir), out_dir, desc="transfer_robustness")
    res = sweep.results
    summary = summarise(config, res)
    summary["bridge"] = summarise_bridge(config, res, summary["cells"])
    summary["paper"] = PAPER
    summary["num_failed"] = sweep.failed
    summary["failures"] = sweep.failures
    summary["budgets"] = config.budget_names()
    summary["settings"] = {
        s: {"surface_bias": config.data_config(s).surface_bias,
            "decoy_rate": config.data_config(s).decoy_rate}
        for s in config.settings
    }  # fmt: skip
    summary["pretrain"] = {
        k: {"val_curve_last": [c[-1] for c in r["val_curve"]], "objective": r["objective"]}
        for k, r in res.items()
        if r.get("kind") == "pretrain"
    }
    summary["source_test_accuracy"] = {
        k: r["source_test_accuracy"] for k, r in res.items() if r.get("kind") == "source"
    }
    summary["bow_baseline"] = {
        f"{r['setting']}|{r['task']}": {k: r[k] for k in ("target_train", "source_train")}
        for r in res.values()
        if r.get("kind") == "baseline"
    }
    summary["unit_seconds"] = float(sum(r.get("seconds", 0.0) for r in sweep.records.values()))
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Table and figures


def _pm(stats: dict | None, digits: int = 1) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:+.{digits}f} ± {stats['std']:.{digits}f}"


def table(summary: dict) -> list[dict]:
    rows = []
    b = summary["budgets"][0]
    paper = f"GPT-2 hate: {PAPER['delta_oacc']:+.2f} / {PAPER['delta_asr']:+.1f}"
    for cell in sorted(
        summary["cells"].values(), key=lambda c: (c["setting"], c["arch"], c["ft"], c["n_params"])
    ):
        rows.append(
            dict(
                quantity=(
                    f"[{cell['setting']}] {cell['arch']} {cell['size']} ({cell['n_params']:,} "
                    f"params, {cell['ft']}): ΔOAcc / ΔASR@{b} (points, mean ± std over seeds)"
                ),
                theory=paper,
                measured=f"{_pm(cell['delta_oacc'])} / {_pm(cell[f'delta_asr_{b}'])}",
                verdict="ASR up" if (cell[f"delta_asr_{b}"]["mean"] or 0) > 0 else "ASR down",
            )
        )
    for key, c in summary["claims"].items():
        setting, arch = key.split("|")
        rows.append(
            dict(
                quantity=f"[{setting}] {arch}: transfer raises ASR@{c['budget']} (sizes with ΔASR > 0)",
                theory="ΔASR > 0",
                measured=f"{c['n_sizes_asr_up']} of {len(c['sizes'])}",
                verdict="holds" if c["transfer_raises_asr"] else "does not hold",
            )
        )
        slope = c["slope_per_decade"]
        rows.append(
            dict(
                quantity=f"[{setting}] {arch}: the ASR rise shrinks with size (slope of ΔASR per decade of params)",
                theory="< 0",
                measured="n/a" if slope is None else f"{slope:+.1f}",
                verdict="holds" if c["rise_shrinks_with_size"] else "does not hold",
            )
        )
    for key, r in sorted(summary.get("bow_baseline", {}).items()):
        setting, task = key.split("|")
        rows.append(
            dict(
                quantity=(
                    f"[{setting}] {task}: bag-of-words logistic baseline, test accuracy (%) from "
                    f"{r['target_train']['n_rows']:,} target / {r['source_train']['n_rows']:,} "
                    "source rows"
                ),
                theory="",
                measured=(
                    f"{100 * r['target_train']['test_accuracy']:.1f} / "
                    f"{100 * r['source_train']['test_accuracy']:.1f}"
                ),
                verdict="",
            )
        )
    for key, r in summary.get("bridge", {}).items():
        setting, arch = key.split("|")
        for q in ("lambda_max", "overlap", "gamma_fisher"):
            rho = r["spearman_pairs"][q]
            rows.append(
                dict(
                    quantity=f"[{setting}] {arch} bridge: Spearman(Δ{q}, ΔASR) over pairs",
                    theory="",
                    measured="n/a" if rho is None else f"{rho:+.2f}",
                    verdict="",
                )
            )
    for row in rows:
        row["experiment"] = "transfer_robustness"
    return rows


def plot(out_dir: pathlib.Path, fig_dir: pathlib.Path) -> list[pathlib.Path]:
    summary = read_json(pathlib.Path(out_dir) / "summary.json")
    b = summary["budgets"][0]
    cells = list(summary["cells"].values())
    archs = sorted({c["arch"] for c in cells})
    settings = sorted({c["setting"] for c in cells}, reverse=True)
    paths = []
    fig, axes = plotting.figure(2, max(len(archs), 1), size=(4.4, 3.2))
    for j, arch in enumerate(archs):
        for row, (key, label, ref) in enumerate(
            ((f"delta_asr_{b}", f"ΔASR@{b} (points)", PAPER["delta_asr"]),
             ("delta_oacc", "ΔOAcc (points)", PAPER["delta_oacc"]))
        ):  # fmt: skip
            ax = axes[row, j]
            for i, setting in enumerate(settings):
                for ft, marker in (("full", "o-"), ("lora", "s")):
                    sel = sorted(
                        (c for c in cells if c["arch"] == arch and c["setting"] == setting
                         and c["ft"] == ft and c[key]["mean"] is not None),
                        key=lambda c: c["n_params"],
                    )  # fmt: skip
                    if not sel:
                        continue
                    x = np.array([c["n_params"] for c in sel]) * (1.06 if ft == "lora" else 1)
                    ax.errorbar(
                        x, [c[key]["mean"] for c in sel], yerr=[c[key]["std"] for c in sel],
                        fmt=marker, color=f"C{i}", capsize=3, ms=4,
                        mfc="white" if ft == "lora" else None,
                        label=f"{setting}" + (" (LoRA)" if ft == "lora" else ""),
                    )  # fmt: skip
            ax.axhline(0.0, color="k", lw=0.8)
            ax.axhline(ref, color="0.5", ls=":", lw=1.2, label="paper: GPT-2, hate")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("parameters")
            ax.set_ylabel(label)
            ax.set_title(f"{arch}: transfer − direct", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    paths.append(plotting.save(fig, pathlib.Path(fig_dir) / "transfer_robustness.png"))

    if len(settings) > 1:
        fig, axes = plotting.figure(1, max(len(archs), 1), size=(4.4, 3.2))
        sizes = sorted({c["size"] for c in cells}, key=lambda s: PRESETS[s][0])
        for j, arch in enumerate(archs):
            ax = axes[0, j]
            width = 0.8 / len(settings)
            for i, setting in enumerate(settings):
                sel = {c["size"]: c for c in cells if c["arch"] == arch and
                       c["setting"] == setting and c["ft"] == "full"}  # fmt: skip
                xs = [k + (i - (len(settings) - 1) / 2) * width for k in range(len(sizes))]
                ys = [sel[s][f"delta_asr_{b}"]["mean"] if s in sel else np.nan for s in sizes]
                es = [sel[s][f"delta_asr_{b}"]["std"] if s in sel else np.nan for s in sizes]
                sb = summary["settings"][setting]
                ax.bar(xs, ys, width, yerr=es, capsize=2, color=f"C{i}",
                       label=f"{setting} (surface_bias {sb['surface_bias']:g}, decoys {sb['decoy_rate']:g})")  # fmt: skip
            ax.axhline(0.0, color="k", lw=0.8)
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels(sizes)
            ax.set_xlabel("model size")
            ax.set_ylabel(f"ΔASR@{b} (points)")
            ax.set_title(f"{arch}: the surface-form knob", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=6)
        paths.append(plotting.save(fig, pathlib.Path(fig_dir) / "transfer_robustness_surface.png"))

    bridge = summary.get("bridge", {})
    if bridge:
        labels = {"lambda_max": "Δ λ_max(∇²L_R)", "overlap": "Δ overlap ‖Pg‖/‖g‖",
                  "gamma_fisher": "Δ coupling γ_F"}  # fmt: skip
        fig, axes = plotting.figure(1, len(labels), size=(3.6, 3.1))
        for j, (q, label) in enumerate(labels.items()):
            ax = axes[0, j]
            for i, (key, rec) in enumerate(sorted(bridge.items())):
                xs = [v for p in rec["per_pair"].values() for v in p[q]]
                ys = [np.nan if a is None else a for p in rec["per_pair"].values()
                      for a in p["delta_asr"]]  # fmt: skip
                rho = rec["spearman_seeds"][q]
                tag = "n/a" if rho is None else f"{rho:+.2f}"
                ax.plot(
                    xs, ys, "o", ms=3.5, color=f"C{i}", label=f"{key.replace('|', ', ')}: ρ {tag}"
                )
            ax.axhline(0.0, color="k", lw=0.6)
            ax.axvline(0.0, color="k", lw=0.6)
            ax.set_xlabel(f"{label}, transfer − direct")
            ax.set_ylabel(f"ΔASR@{b} (points)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.suptitle(
            f"bridge at the start of the target fine-tune ({next(iter(bridge.values())).get('size', '')} "
            "model; one point per pair and seed)", fontsize=9,
        )  # fmt: skip
        paths.append(plotting.save(fig, pathlib.Path(fig_dir) / "transfer_robustness_bridge.png"))
    return paths


if __name__ == "__main__":
    import quartic.harness.cli

    raise SystemExit(quartic.harness.cli.main(["run", "transfer_robustness", *sys.argv[1:]]))
