"""The transfer study's pretraining alone, to tell code changes from machine changes.

    python benchmarks/pretrain_drift.py OUT.json                     # this code, XLA's defaults
    XLA_FLAGS=--xla_cpu_max_isa=AVX2 python benchmarks/pretrain_drift.py OUT.json
    PYTHONPATH=CHECKOUT python benchmarks/pretrain_drift.py OUT.json  # another commit's code

Pretrains the 30k decoders of the long-sentence WIR transfer command (docs/results.md; its
overrides, though pretraining reads only the world's and its own) in a fresh temporary folder, so nothing cached is reused, and writes each seed's validation curve with
the environment that computed it (``quartic.harness.provenance``). The committed runs
``results/full/transfer_robustness_lpft_long{,_wir}`` hold the curves of the machine they ran on
(``pretrain.pretrain__decoder__30k.val_curve_last``); comparing them with this script's output on
one machine, at their commit and at this one, separates the two causes. Results:
``benchmarks/results/pretrain-drift/``. About 2.5 min on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax

from quartic.harness.cli import load_experiment
from quartic.harness.config import apply_overrides
from quartic.studies.transfer import pipeline

OVERRIDES = ("sizes=30k", "archs=decoder", "lora_size=", "settings=surface", "pairs=hate>political",
             "min_len=48", "max_len=64", "max_synonyms=24", "pooling=mean", "probe_steps=400",
             "lr=3e-4", "target_steps=400", "attack_method=wir")  # fmt: skip


def _environment() -> dict:
    try:
        from quartic.harness import provenance
    except ImportError:  # a checkout older than provenance: the versions, flags and commit
        root = pathlib.Path(pipeline.__file__).resolve().parents[3]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
        return {"quartic_commit": commit, "jax": jax.__version__,
                "xla_flags": os.environ.get("XLA_FLAGS", "")}  # fmt: skip
    return provenance.environment()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    args = parser.parse_args(argv)
    exp = load_experiment("transfer_robustness")
    config = apply_overrides(exp.Config(), OVERRIDES)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, info = pipeline.pretrained(config, pathlib.Path(tmp), "30k", "decoder")
    record = {
        "command": " ".join(["python", *sys.argv]),
        "overrides": list(OVERRIDES),
        "quartic_file": pipeline.__file__,
        "seconds": time.perf_counter() - t0,
        "val_curve_last": [curve[-1] for curve in info["val_curve"]],
        "val_curve": info["val_curve"],
        "environment": _environment(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("val_curve_last", "seconds")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
