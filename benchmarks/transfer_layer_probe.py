"""Where do the transfer study's pretrained bodies hold the task? Linear probes at every depth.

Issue 17 item 2: with the study's recipe (mean pooling, LP-FT) the decoders beat word counts and
the encoders do not, although masked-token pretraining clusters their synonyms as well (docs/
results.md). This script asks where the task's information sits. On the full configuration's data
(one setting and target, its 600 target rows, 512 validation rows, 1,600 test rows) and the
study's pretrained bodies (``pipeline.pretrained``, cached in ``--work``; the same bodies as
``benchmarks/transfer_readout.py``), it fits a logistic regression (exact, L2 chosen on
validation: ``baseline.feature_logistic``) on the mean-pooled states at each depth
(``Transformer.layer_features``: the embeddings, each block's output, the final LayerNorm's, which
is what the classifier head reads), per seed, for:

- the pretrained bodies;
- the same models at initialisation (what pretraining added);
- the bodies after the study's direct fine-tuning (probe then full, ``Config``'s recipe), with
  the fine-tuned classifier's own test accuracy beside (what fine-tuning made of it).

Beside them, for every target of the setting, baselines on the same rows: word counts
(``bow_logistic``), counts of synonym clusters (``bow_logistic(groups=...)``: every content token
counted as its concept), which is what a linear model that knew the clusters exactly could learn,
and the task's rule itself (a cue concept present), the Bayes classifier.

    python benchmarks/transfer_layer_probe.py --size 30k --archs decoder,encoder
    python benchmarks/transfer_layer_probe.py --plot figures/full/transfer_layer_probe.png

Writes benchmarks/results/transfer-layer-probe-SIZE-SETTING-TARGET[-VARIANT].json; ``--plot``
draws the default variant's records of every size found (nothing is computed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import write_record  # noqa: E402
from experiments.transfer_robustness import Config  # noqa: E402
from quartic.models.transformer import Transformer, count_params, functional  # noqa: E402
from quartic.studies.transfer import baseline, models, pipeline, probe, trainer  # noqa: E402
from quartic.tasks import synonyms as syn  # noqa: E402


def concept_groups(lang) -> np.ndarray:
    """Each token id's column for ``bow_logistic(groups=...)``: a content token its concept's,
    every other word its own, PAD none."""
    groups = np.where(
        lang.is_content, lang.concept_of, lang.n_concepts + np.arange(lang.vocab_size)
    )
    groups[0] = -1
    return groups


def baselines(config, lang, tasks, splits, setting) -> dict:
    """Per target, the test accuracy of word counts and of concept counts (each fitted on its
    600 target rows, L2 chosen on 512 validation rows), and of the task's rule itself (label 1 iff
    a cue concept is present: the Bayes classifier, ``1 − label_noise`` where no decoy misleads)."""
    out = {}
    for name, task in tasks.items():
        split = splits[(setting, name)]
        val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
        args = (split.target_train, val, split.test, lang.vocab_size)
        rule = syn.cue_present(lang, task, split.test["tokens"])
        out[name] = {
            "word_counts": baseline.bow_logistic(*args).test_accuracy,
            "concept_counts": baseline.bow_logistic(
                *args, groups=concept_groups(lang)
            ).test_accuracy,
            "rule": float(np.mean(rule == np.asarray(split.test["labels"]))),
        }
    return out


def depth_names(cfg) -> list[str]:
    return ["embeddings", *(f"block_{i + 1}" for i in range(cfg.n_layers)), "final_norm"]


def seeds_and_mean(values) -> dict:
    return {"seeds": [float(v) for v in values], "mean": float(np.mean(values))}


def layer_probes(cfg, params_list, data) -> dict:
    """Per depth, the probe's test accuracy for each parameter set (one per seed) and their mean."""
    apply, _ = functional(Transformer(cfg, rngs=nnx.Rngs(0)), method="layer_features")
    accs = probe.probe_accuracies(jax.jit(apply), params_list, data)  # [seeds, depths]
    return {name: seeds_and_mean(accs[:, j]) for j, name in enumerate(depth_names(cfg))}


RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def plot(path: str, setting: str = "plain", target: str = "political") -> None:
    """Probe accuracy against depth, one panel per size: each architecture pretrained (solid)
    and fine-tuned (dashed) with its classifier's own accuracy (marker at the right), beside
    the baselines (word counts, concept counts, the rule)."""
    from quartic.harness import plotting

    records = []
    for f in sorted(RESULTS.glob(f"transfer-layer-probe-*-{setting}-{target}.json")):
        records.append(json.loads(f.read_text()))
    if not records:
        raise SystemExit(f"no records transfer-layer-probe-*-{setting}-{target}.json in {RESULTS}")
    records.sort(key=lambda r: r["result"][next(a for a in ARCHS if a in r["result"])]["n_params"])
    fig, axes = plotting.figure(1, len(records), size=(4.6, 3.6))
    for ax, rec in zip(axes[0], records, strict=True):
        res, base = rec["result"], rec["result"]["baselines"][target]
        for arch, colour in zip(ARCHS, ("C0", "C3"), strict=True):
            if arch not in res:
                continue
            depths = list(res[arch]["pretrained"])
            x = np.arange(len(depths))
            for arm, style in (("pretrained", "-"), ("fine_tuned", "--"), ("init", ":")):
                y = [res[arch][arm][d]["mean"] for d in depths]
                ax.plot(x, y, style, color=colour, marker="o", ms=3,
                        label=f"{arch}, {arm.replace('_', '-')}")  # fmt: skip
            ax.plot([x[-1] + 0.6], [res[arch]["fine_tuned_classifier"]["mean"]], "*",
                    color=colour, ms=10, label=f"{arch} classifier")  # fmt: skip
        for key, style in (("word_counts", "k:"), ("concept_counts", "k--"), ("rule", "k-")):
            ax.axhline(base[key], ls=style[1:], color="k", lw=0.8, alpha=0.6)
            ax.text(0, base[key] + 0.004, key.replace("_", " "), fontsize=7)
        ax.set_xticks(x, [d.replace("_", " ") for d in depths], rotation=30, fontsize=7)
        ax.set_ylabel(f"test accuracy ({target}, {setting})")
        ax.set_title(f"{rec['size']}: linear probe of mean-pooled states", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    print(f"wrote {plotting.save(fig, path)}")


ARCHS = ("decoder", "encoder")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="30k")
    p.add_argument("--archs", default="decoder,encoder")
    p.add_argument("--setting", default="plain", choices=("plain", "surface"))
    p.add_argument("--target", default="political")
    p.add_argument("--work", default="results/transfer_readout")
    p.add_argument(
        "--pooling",
        default="mean",
        choices=("mean", "max", "last"),
        help="how the probed states are pooled over the tokens (and the classifier's)",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="pretraining steps (default: the study's); cached in WORK/steps-N",
    )
    p.add_argument(
        "--mask-rate",
        type=float,
        default=None,
        help="the encoders' masked-token rate in pretraining (default: the study's)",
    )
    p.add_argument("--plot", metavar="PNG", help="draw the committed records and stop")
    args = p.parse_args()
    if args.plot:
        return plot(args.plot, args.setting, args.target)
    size, archs = args.size, args.archs.split(",")
    config = Config(settings=(args.setting,), sizes=(size,), archs=tuple(archs), lora_size="",
                    plain_sizes=(size,), pooling=args.pooling, n_seeds=3)  # fmt: skip
    work = args.work
    if args.pretrain_steps is not None:  # the cache is named by model, not by its steps
        config = dataclasses.replace(config, pretrain_steps=args.pretrain_steps)
        work = f"{args.work}/steps-{args.pretrain_steps}"
    lang, tasks, splits, _ = pipeline.world(config)
    split = splits[(args.setting, args.target)]
    data = {
        "train": split.target_train,
        "val": {k: v[: config.n_val_eval] for k, v in split.val.items()},
        "test": split.test,
    }
    result = {"baselines": baselines(config, lang, tasks, splits, args.setting)}
    for target, b in result["baselines"].items():
        print(f"{target}: word counts {b['word_counts']:.3f}, concept counts "
              f"{b['concept_counts']:.3f}, the rule {b['rule']:.3f}")  # fmt: skip
    fc = trainer.FitConfig(config.target_steps, config.batch_size, config.lr,
                           config.target_eval_every)  # fmt: skip
    for arch in archs:
        t0 = time.time()
        cfg = pipeline.model_cfg(config, size, arch)
        mask = args.mask_rate if arch == "encoder" else None
        bodies, _ = pipeline.pretrained(config, work, size, arch, mask_rate=mask)
        lm = pipeline.model_cfg(config, size, arch, head="lm")
        fresh = [models.init_params(cfg, 1000 + i) for i in range(len(bodies))]
        start = [models.carry_body(f, b) for f, b in zip(fresh, bodies, strict=True)]
        init = [models.carry_body(f, models.init_params(lm, 100 + i))
                for i, f in enumerate(fresh)]  # fmt: skip
        unit = ("target", args.setting, size, arch, "full", args.target, "direct")
        tuned = pipeline._fine_tune(config, cfg, models.stack(start), data["train"], data["val"],
                                    fc, "full", unit, f"{arch} direct")  # fmt: skip
        probs = trainer.predict(cfg, tuned.params, data["test"]["tokens"])
        acc = (probs.argmax(-1) == np.asarray(data["test"]["labels"])[None, :]).mean(axis=1)
        result[arch] = {
            "n_params": count_params(cfg),
            "pretrained": layer_probes(cfg, start, data),
            "init": layer_probes(cfg, init, data),
            "fine_tuned": layer_probes(cfg, models.unstack(tuned.params), data),
            "fine_tuned_classifier": seeds_and_mean(acc),
            "seconds": time.time() - t0,
        }
        for arm in ("init", "pretrained", "fine_tuned"):
            row = "  ".join(f"{k} {v['mean']:.3f}" for k, v in result[arch][arm].items())
            print(f"{arch} {arm:10s} {row}")
        print(f"{arch} fine-tuned classifier {acc.mean():.3f} ({time.time() - t0:.0f} s)")
    tag = (
        ("" if args.pooling == "mean" else f"-{args.pooling}")
        + ("" if args.mask_rate is None else f"-mask{args.mask_rate:g}")
        + ("" if args.pretrain_steps is None else f"-steps{args.pretrain_steps}")
    )
    write_record(
        f"benchmarks/results/transfer-layer-probe-{size}-{args.setting}-{args.target}{tag}.json",
        size=size, setting=args.setting, target=args.target, depths=depth_names(cfg),
        pooling=args.pooling, mask_rate=args.mask_rate, pretrain_steps=config.pretrain_steps,
        result=result,
    )  # fmt: skip


if __name__ == "__main__":
    main()
