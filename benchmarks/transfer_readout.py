"""Which read-out lets the transfer study's pretrained models beat word counts (issue 17 item 2)?

The full configuration's data (plain setting, target ``political``, its 600 target rows), the
study's pretrained bodies (``pipeline.pretrained``, cached in ``--work``) and the direct arm's
keys; per read-out (the classifier's pooling) and recipe, the clean test accuracy of each of the 3
seeds, beside the bag-of-words baseline on the same rows. Recipes: full fine-tuning, the head alone
(a linear probe of the frozen body), and the probe then full fine-tuning (LP-FT).

    python benchmarks/transfer_readout.py --size 30k --archs decoder,encoder --poolings last,mean
    python benchmarks/transfer_readout.py --size 30k --archs decoder --poolings mean --recipes more
    python benchmarks/transfer_readout.py --size 100k --archs decoder --poolings last,mean

(2026-12-06, 2 cores: 30k about 2 min per architecture, 100k about 4 min.) Writes
benchmarks/results/transfer-readout-SIZE-RECIPES.json. What it found led to the study's
``pooling`` and ``probe_steps`` knobs (docs/results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np

from experiments.transfer_robustness import Config
from quartic.studies.transfer import baseline, models, pipeline, trainer

HEAD = ("head", trainer.FitConfig(400, 32, 1e-2, 50))
RECIPES = {
    "base": {
        "full 1e-3:200": [("full", trainer.FitConfig(200, 32, 1e-3, 25))],
        "head 1e-2:400": [HEAD],
        "head 1e-2:400 then full 1e-4:400": [HEAD, ("full", trainer.FitConfig(400, 32, 1e-4, 50))],
    },
    "more": {
        "LP then full 1e-4:1000": [HEAD, ("full", trainer.FitConfig(1000, 32, 1e-4, 100))],
        "LP then full 3e-4:400": [HEAD, ("full", trainer.FitConfig(400, 32, 3e-4, 50))],
        "full 3e-4:400": [("full", trainer.FitConfig(400, 32, 3e-4, 50))],
        "LP then full 1e-4:400": [HEAD, ("full", trainer.FitConfig(400, 32, 1e-4, 50))],
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="30k")
    p.add_argument("--archs", default="decoder")
    p.add_argument("--poolings", default="last,mean")
    p.add_argument("--recipes", choices=list(RECIPES), default="base")
    p.add_argument("--work", default="results/transfer_readout")
    args = p.parse_args()
    size, archs, target = args.size, args.archs.split(","), "political"
    config = Config(settings=("plain",), sizes=(size,), archs=tuple(archs), lora_size="",
                    plain_sizes=(size,), n_seeds=3)  # fmt: skip
    lang, _, splits, _ = pipeline.world(config)
    split = splits[("plain", target)]
    val = {k: v[: config.n_val_eval] for k, v in split.val.items()}
    bow = baseline.bow_logistic(split.target_train, val, split.test, lang.vocab_size)
    print(f"word counts, {len(split.target_train['labels'])} target rows: {bow.test_accuracy:.3f}")
    out = {"bow": bow.test_accuracy}
    for arch in archs:
        bodies, _ = pipeline.pretrained(config, args.work, size, arch)
        keys = pipeline._keys(config, "target", "plain", size, arch, "full", target, "direct")
        for pooling in args.poolings.split(","):
            cfg = dataclasses.replace(pipeline.model_cfg(config, size, arch), pooling=pooling)
            start = models.stack([models.carry_body(models.init_params(cfg, 1000 + i), b)
                                  for i, b in enumerate(bodies)])  # fmt: skip
            for name, stages in RECIPES[args.recipes].items():
                t0, params = time.time(), start
                for trainable, fc in stages:
                    res = trainer.fit("clf", cfg, params, split.target_train, val, keys, fc,
                                      trainable=trainable, desc=name)  # fmt: skip
                    params = res.params
                probs = trainer.predict(cfg, params, split.test["tokens"])
                acc = (probs.argmax(-1) == np.asarray(split.test["labels"])[None, :]).mean(axis=1)
                out[f"{arch} {pooling} {name}"] = acc.tolist()
                print(f"{arch} {pooling:5s} {name:34s} {acc.mean():.3f} ± {acc.std():.3f} "
                      f"best step {res.best_step.tolist()} {time.time() - t0:.0f} s")  # fmt: skip
    path = pathlib.Path(f"benchmarks/results/transfer-readout-{size}-{args.recipes}.json")
    path.write_text(json.dumps(out, indent=1))
    print(path)


if __name__ == "__main__":
    main()
