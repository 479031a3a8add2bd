"""`quartic diagnose`: the command-line face of :func:`quartic.studies.diagnose.diagnose`.

``quartic diagnose --checkpoint DIR (--task NAME | --data FILE) --lr LR (--rank D |
--explained-variance V)``.

Diagnoses one of quartic's own aligned transformers (a θ* directory written by
:func:`quartic.studies.training.make_aligned_model`) against a benign task of its token world or
your own token data (checked by :func:`quartic.tasks.token_world.load_batch`), prints the report,
and writes ``diagnosis.json`` and ``diagnosis.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib

import jax

from quartic.core.errors import QuarticError
from quartic.harness import checkpoint, runs
from quartic.studies import collapse, training
from quartic.studies.diagnose import diagnose, plot_diagnosis
from quartic.tasks import token_world as tw

DESCRIPTION = __doc__.split("\n\n", 1)[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments, on the parser the ``quartic`` command gives it."""

    parser.add_argument(
        "--checkpoint",
        required=True,
        help="θ* directory (saved by quartic.studies.training.save_theta_star: params/ + meta.json)",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--task", help=f"one of {', '.join(tw.BENIGN_TASKS)}, harmful")
    data.add_argument(
        "--data",
        help="your own fine-tuning data: .npz with tokens [N, seq_len] (optional targets, mask) "
        "or .npy of sequences [N, seq_len + 1]",
    )
    parser.add_argument("--category", type=int, default=0, help="harm category of the skill")
    parser.add_argument("--loss", choices=("kl", "refusal"), default="kl")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--horizon", type=int, default=200, help="gradient-descent steps")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--rank", type=int)
    group.add_argument("--explained-variance", type=float)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--run", action="store_true", help="also fine-tune and compare")
    parser.add_argument("--out", default="results/diagnose")


def run(args: argparse.Namespace) -> int:
    """Diagnose, print the report, write ``diagnosis.json`` and ``diagnosis.png``."""

    path = pathlib.Path(args.checkpoint)
    if not checkpoint.exists(path):
        raise QuarticError(f"no θ* checkpoint at {path} (expected params/ and meta.json)")
    if args.task is not None and args.task not in (*tw.BENIGN_TASKS, "harmful"):
        raise QuarticError(
            f"unknown task {args.task!r}; choose one of {', '.join(tw.BENIGN_TASKS)}, harmful"
        )
    jax.config.update("jax_enable_x64", True)
    model, meta = training.load_theta_star(path)
    world = tw.TokenWorld(tw.WorldConfig(**meta["world_config"]))
    if not 0 <= args.category < world.config.n_categories:
        raise QuarticError(
            f"category must be in [0, {world.config.n_categories}), got {args.category}"
        )
    if args.data is not None:
        ft_batch = tw.load_batch(args.data, world.vocab_size, world.config.seq_len)
    apply_fn, params = training.functional(model)
    setup = collapse.CollapseSetup(apply_fn, params, world, args.category)
    if args.data is None:
        ft_batch = setup.task_batch(args.task)
    diag = diagnose(
        setup.align_fns[args.loss],
        setup.lm_fn,
        setup.theta,
        align_batch=setup.align_data[args.loss],
        ft_batch=ft_batch,
        fisher=collapse.dense_fisher(setup),
        lr=args.lr,
        horizon=args.horizon,
        rank=args.rank,
        explained_variance=args.explained_variance,
        threshold=args.threshold,
        run=args.run,
    )
    print(diag)
    out = pathlib.Path(args.out)
    runs.write_json_atomic(out / "diagnosis.json", diag.to_dict())
    plot_diagnosis(diag, out / "diagnosis.png")
    print(f"wrote {out / 'diagnosis.json'} and {out / 'diagnosis.png'}")
    return 0
