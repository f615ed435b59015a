"""Commands that help choose a job's settings before the real run: `shoal compare` (strategies),
`shoal batch-find`, `shoal schedule`, `shoal lr-find` and `shoal sweep`.

The modules that do the work are imported inside the handlers: they load torch or Ray, which the
driver's start-up (`shoal --help`) must not."""

from __future__ import annotations

import argparse

from shoal.cli.command import Command, config_args, load_job, out_arg, out_path
from shoal.cli.output import note, say
from shoal.errors import ShoalError


def _compare_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument(
        "--budget",
        required=True,
        help="STEPS (e.g. 300: async gets N x as many updates for the same samples) or SECONDS (e.g. 60s)",
    )
    p.add_argument(
        "--target-loss", type=float, default=None, help="loss for time-to-target (default: the worse final loss)"
    )


def compare(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    from shoal import rundir
    from shoal.compare import run_both, table

    report = run_both(cfg, args.budget, args.target_loss)
    say(table(report))
    say(f"[shoal] report: {rundir.resolve(cfg) / 'compare' / 'report.md'}")
    return 0


def _batch_find_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory the process may use, e.g. 8GB (CPU; default: the cgroup limit or available memory / ranks per node)",
    )
    p.add_argument("--max-batch", type=int, default=4096, help="largest micro-batch to try (default 4096)")
    p.add_argument(
        "--target-batch", type=int, default=None, help="global batch to suggest keys for (default: the job's)"
    )
    out_arg(p, "DIR", "where to write the report (default: RUN_DIR/batch-find)")


def batch_find(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    from shoal.batchfind import find
    from shoal.data.writer import parse_bytes

    limit = parse_bytes(args.max_memory, "--max-memory") / 2**20 if args.max_memory else None
    if args.max_batch < 1:
        raise ShoalError(f"--max-batch: must be >= 1 (got {args.max_batch})")
    out = out_path(args, cfg, "batch-find")
    r = find(cfg, out, limit, args.max_batch, args.target_batch, say=note)
    if not r["largest_batch"]:
        raise ShoalError("shoal batch-find: not even a micro-batch of 1 fits; raise --max-memory or shrink the model")
    say(
        f"[shoal] largest micro-batch {r['largest_batch']}; for a global batch of {r['target_batch']}: "
        f"data.batch_size={r['data.batch_size']} train.grad_accum_steps={r['train.grad_accum_steps']}"
    )
    say(f"[shoal] report: {out / 'report.json'}; plot: {r['plot']}")
    return 0


def _schedule_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    out_arg(p, "PNG", "default: RUN_DIR/schedule.png")


def schedule(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    from shoal.optim import plot_schedule

    out = out_path(args, cfg, "schedule.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    lr, momentum = plot_schedule(cfg, out)
    extra = f", momentum {min(momentum):.3g}-{max(momentum):.3g}" if momentum else ""
    say(f"[shoal] {cfg.schedule.name}: lr {min(lr):.3g}-{max(lr):.3g} over {len(lr)} steps{extra}; plot: {out}")
    return 0


def _lr_find_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100)


def lr_find(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    from shoal.lrfind import run

    result = run(cfg, args.min_lr, args.max_lr, args.steps)
    say(
        f"[shoal] suggested optim.lr={result['suggested_lr']:.3g} (loss lowest at {result['min_loss_lr']:.3g}); plot: {result['plot']}"
    )
    return 0


def _sweep_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values to try (repeatable: the product is run)",
    )
    p.add_argument("--seeds", type=int, default=1, help="runs per grid point with seeds seed, seed+1, ...")
    p.add_argument(
        "--parallel", type=int, default=None, help="runs side by side (default: as many as the cluster holds)"
    )


def sweep(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    if args.seeds < 1:
        raise ShoalError(f"--seeds: must be >= 1 (got {args.seeds})")
    from shoal.sweep import markdown, run

    report = run(cfg, args.grid, args.seeds, args.parallel)
    say(markdown(report["table"]))
    return 0


COMPARE = Command(
    "compare", "train the job with allreduce and with async_ps on one budget and compare", _compare_args, compare
)
BATCH_FIND = Command(
    "batch-find",
    "largest micro-batch that fits, throughput per size, suggested batch keys",
    _batch_find_args,
    batch_find,
)
SCHEDULE = Command(
    "schedule",
    "plot the learning rate (and one-cycle momentum) over the run, before training",
    _schedule_args,
    schedule,
)
LR_FIND = Command(
    "lr-find", "learning-rate range test on all the job's workers; plot and suggestion", _lr_find_args, lr_find
)
SWEEP = Command("sweep", "run a grid of config values x seeds; table and plot", _sweep_args, sweep)
