"""The `shoal` command. The only place that turns a ShoalError into one line and an exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from shoal import __version__
from shoal.errors import ShoalError


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar (tests parse launch scripts and manifests with it)."""
    p = argparse.ArgumentParser(
        prog="shoal", description="Distributed data-parallel training for PyTorch from one YAML file."
    )
    p.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train with N DDP workers started by Ray (default: the bundled quickstart)")
    _config_args(t, optional=True)
    t.add_argument(
        "--resume", action="store_true", help="continue the run in run.dir from its latest complete checkpoint"
    )

    w = sub.add_parser("worker", help="run one rank from torchrun's environment (torchrun ... -m shoal worker CONFIG)")
    _config_args(w, optional=False)
    w.add_argument(
        "--resume", action="store_true", help="continue the run in run.dir from its latest complete checkpoint"
    )

    v = sub.add_parser(
        "validate",
        help="run every check that needs only the config and files; print the resolved config or the first error",
    )
    _config_args(v, optional=False)
    v.add_argument(
        "--resume", action="store_true", help="check as `shoal train --resume` would (run.dir may hold a run)"
    )

    su = sub.add_parser("submit", help="run the job on a remote Ray cluster through its Jobs API")
    _config_args(su, optional=False)
    _cluster_args(su)
    su.add_argument(
        "--working-dir",
        default=None,
        help="directory uploaded with the job (your model code); default: the current one",
    )
    su.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="pip requirement for the job's environment (repeatable)",
    )
    su.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave these out of the upload (repeatable)"
    )
    su.add_argument(
        "--python",
        default=None,
        help="interpreter that runs `-m shoal` on the cluster (default: python, or this one for a local cluster)",
    )
    su.add_argument("--resume", action="store_true", help="continue the run in run.dir from its latest checkpoint")
    su.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the logs")
    su.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="fail if the job has not started after S seconds (default 600)",
    )
    su.set_defaults(func=_cmd_submit)

    j = sub.add_parser("jobs", help="list | status ID | logs ID | stop ID: jobs on a Ray cluster")
    j.add_argument("action", choices=["list", "status", "logs", "stop"])
    j.add_argument("job_id", nargs="?", metavar="ID")
    _cluster_args(j)
    j.set_defaults(func=_cmd_jobs)

    c = sub.add_parser("compare", help="train the job with allreduce and with async_ps on one budget and compare")
    _config_args(c, optional=False)
    c.add_argument(
        "--budget",
        required=True,
        help="STEPS (e.g. 300: async gets N x as many updates for the same samples) or SECONDS (e.g. 60s)",
    )
    c.add_argument(
        "--target-loss", type=float, default=None, help="loss for time-to-target (default: the worse final loss)"
    )
    c.set_defaults(func=_cmd_compare)

    ck = sub.add_parser("check", help="find data, loss, model and config mistakes before training (exit 1 if any)")
    _config_args(ck, optional=False)
    ck.add_argument("--out", default=None, metavar="DIR", help="where to write the report (default: RUN_DIR/check)")
    ck.set_defaults(func=_cmd_check)

    bf = sub.add_parser("batch-find", help="largest micro-batch that fits, throughput per size, suggested batch keys")
    _config_args(bf, optional=False)
    bf.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="memory the process may use, e.g. 8GB (CPU; default: the cgroup limit or available memory / ranks per node)",
    )
    bf.add_argument("--max-batch", type=int, default=4096, help="largest micro-batch to try (default 4096)")
    bf.add_argument(
        "--target-batch", type=int, default=None, help="global batch to suggest keys for (default: the job's)"
    )
    bf.add_argument(
        "--out", default=None, metavar="DIR", help="where to write the report (default: RUN_DIR/batch-find)"
    )
    bf.set_defaults(func=_cmd_batch_find)

    sc = sub.add_parser(
        "schedule", help="plot the learning rate (and one-cycle momentum) over the run, before training"
    )
    _config_args(sc, optional=False)
    sc.add_argument("--out", default=None, metavar="PNG", help="default: RUN_DIR/schedule.png")
    sc.set_defaults(func=_cmd_schedule)

    rp = sub.add_parser("report", help="one self-contained HTML page of a run (or a sweep / comparison)")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.set_defaults(func=_cmd_report)

    d = sub.add_parser("doctor", help="report on a run (finished, failed or running): alerts, suggestions, plots")
    d.add_argument("run_dir", metavar="RUN_DIR")
    d.set_defaults(func=_cmd_doctor)

    lf = sub.add_parser("lr-find", help="learning-rate range test on all the job's workers; plot and suggestion")
    _config_args(lf, optional=False)
    lf.add_argument("--min-lr", type=float, default=1e-6)
    lf.add_argument("--max-lr", type=float, default=1.0)
    lf.add_argument("--steps", type=int, default=100)
    lf.set_defaults(func=_cmd_lr_find)

    sw = sub.add_parser("sweep", help="run a grid of config values x seeds; table and plot")
    _config_args(sw, optional=False)
    sw.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values to try (repeatable: the product is run)",
    )
    sw.add_argument("--seeds", type=int, default=1, help="runs per grid point with seeds seed, seed+1, ...")
    sw.add_argument(
        "--parallel", type=int, default=None, help="runs side by side (default: as many as the cluster holds)"
    )
    sw.set_defaults(func=_cmd_sweep)

    e = sub.add_parser("export", help="write a trained or compressed model for inference, checked against PyTorch")
    e.add_argument(
        "checkpoint",
        metavar="SOURCE",
        help="a checkpoint directory (RUN_DIR/checkpoints/step-000100), a run directory (its latest), "
        "or a model `shoal compress` wrote (RUN_DIR/compress/<variant>)",
    )
    e.add_argument("out", metavar="OUT", help="output file")
    e.add_argument(
        "--format",
        default=None,
        help="state_dict | safetensors | torch_export | onnx (default: from OUT's suffix: .safetensors, .pt2, .onnx, else .pt)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    cp = sub.add_parser("compress", help="prune / quantise a trained model and measure each variant on validation data")
    cp.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    cp.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for the fine-tune job")
    cp.add_argument("--sparsity", default="", help="target sparsities, e.g. 0.5 or 0.3,0.5,0.7,0.9 (a sweep)")
    cp.add_argument("--structured", action="store_true", help="prune whole neurons/channels instead of single weights")
    cp.add_argument("--per-layer", action="store_true", help="the sparsity in every layer, instead of over all of them")
    cp.add_argument("--quantize", default=None, choices=["dynamic", "weight_only"], help="int8 (torchao)")
    cp.add_argument("--finetune", type=int, default=0, metavar="STEPS", help="fine-tune each pruned model, zeros kept")
    cp.add_argument("--out", default=None, metavar="DIR", help="default: RUN_DIR/compress")
    cp.set_defaults(func=_cmd_compress)
    e.set_defaults(func=_cmd_export)

    sh = sub.add_parser("shard", help="write a data set as webdataset tar shards plus manifest.json")
    sh.add_argument(
        "source",
        metavar="SOURCE",
        help="digits | synthetic | a .npz, .csv, .jsonl or text file | a folder of class subfolders of images",
    )
    sh.add_argument("out_dir", metavar="OUT_DIR")
    size = sh.add_mutually_exclusive_group()
    size.add_argument(
        "--samples-per-shard", type=int, default=None, metavar="N", help="samples per shard (default 10000)"
    )
    size.add_argument("--bytes-per-shard", default=None, metavar="SIZE", help="shard size instead, e.g. 64MB")
    sh.add_argument("--block-size", type=int, default=64, help="samples packed per tar entry (default 64)")
    sh.add_argument("--val-fraction", type=float, default=0.1, help="share written as the val split (default 0.1)")
    sh.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
    sh.add_argument("--no-shuffle", action="store_true", help="keep the source's order")
    sh.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    sh.add_argument("--num-samples", type=int, default=100_000, help="synthetic: samples")
    sh.add_argument("--input-shape", type=int, nargs="+", default=[32], help="synthetic: sample shape")
    sh.add_argument("--num-classes", type=int, default=10, help="synthetic: classes")
    sh.add_argument(
        "--task", choices=["classification", "regression", "lm"], default=None, help="task (default: inferred)"
    )
    sh.add_argument("--seq-len", type=int, default=64, help="text and synthetic lm: tokens per sample")
    sh.add_argument("--label-column", default=None, help="CSV: label column name or index (default: the last)")
    sh.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="images: resize to H x W")
    sh.set_defaults(func=_cmd_shard)

    from shoal import k8s  # `shoal k8s render`; imports yaml only, no torch/ray

    k8s.add_parser(sub)

    r = sub.add_parser("config-reference", help="print the config reference (markdown)")
    r.add_argument("--update", metavar="README", help="rewrite the reference between the markers in this file instead")
    r.set_defaults(func=_cmd_reference)
    t.set_defaults(func=_cmd_train)
    w.set_defaults(func=_cmd_worker)
    v.set_defaults(func=_cmd_validate)
    return p


def _config_args(p: argparse.ArgumentParser, optional: bool) -> None:
    p.add_argument("config", nargs="?" if optional else None, metavar="CONFIG", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.1")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument(
        "--token-file",
        default=None,
        help="the cluster's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)",
    )


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`shoal train optim.lr=0.1` has no CONFIG: a first positional with '=' is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def _load(args: argparse.Namespace):
    from shoal.config import load_config
    from shoal.imports import locate_object

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # model.target modules next to the job file import as with `python -m`
    config, overrides = _split_config(args)
    if config is None and args.command != "train":
        raise ShoalError(f"shoal {args.command}: CONFIG is required")
    cfg = load_config(config, overrides)
    for key, target in (("model.target", cfg.model.target), ("data.decode", cfg.data.decode)):
        if target:  # found without running it: the module is imported where it trains
            locate_object(target, key)
    return cfg


def _cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_resume(args, cfg)
    from shoal import cluster, preflight
    from shoal.check.task import before_run

    local = cluster.on_this_machine(cluster.requested_address(cfg.scaling.address))
    preflight.check(cfg, resume=args.resume, local_files=local)
    before_run(cfg, lambda line: print(line, file=sys.stderr, flush=True))
    preflight.check_model(cfg)
    sys.stdout.write(cfg.to_yaml())
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    cfg = _load(args)  # validated here: a typo fails on the laptop, not on the cluster
    from shoal.submit import submit

    if not cfg.run.dir or not os.path.isabs(cfg.run.dir):
        print(
            "[shoal] note: run.dir is not an absolute path: the run directory lands in the job's working "
            "directory on the cluster; set run.dir to shared storage to keep it",
            file=sys.stderr,
        )
    return submit(
        cfg,
        address=args.address,
        token_file=args.token_file,
        working_dir=args.working_dir,
        pip=args.pip,
        python=args.python,
        wait=not args.no_wait,
        start_timeout_s=args.start_timeout,
        excludes=args.exclude,
        resume=args.resume,
    )


def _cmd_jobs(args: argparse.Namespace) -> int:
    from shoal.submit import jobs

    return jobs(args.action, args.job_id, args.address, args.token_file)


def _cmd_compare(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from shoal.compare import run_both, table

    report = run_both(cfg, args.budget, args.target_loss)
    print(table(report))
    from shoal import rundir

    print(f"[shoal] report: {rundir.resolve(cfg) / 'compare' / 'report.md'}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.health.doctor import diagnose

    report = diagnose(Path(args.run_dir))
    sys.stdout.write(report.read_text())
    print(f"\n[shoal] report: {report}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from pathlib import Path

    from shoal import check, rundir

    out = Path(args.out) if args.out else rundir.resolve(cfg) / "check"
    result = check.run(cfg, out, say=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(check.summary_lines(result)), flush=True)
    return result.exit_code


def _cmd_batch_find(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from pathlib import Path

    from shoal import rundir
    from shoal.batchfind import find
    from shoal.data.writer import parse_bytes

    limit = parse_bytes(args.max_memory, "--max-memory") / 2**20 if args.max_memory else None
    if args.max_batch < 1:
        raise ShoalError(f"--max-batch: must be >= 1 (got {args.max_batch})")
    out = Path(args.out) if args.out else rundir.resolve(cfg) / "batch-find"
    r = find(
        cfg, out, limit, args.max_batch, args.target_batch, say=lambda line: print(line, file=sys.stderr, flush=True)
    )
    if not r["largest_batch"]:
        raise ShoalError("shoal batch-find: not even a micro-batch of 1 fits; raise --max-memory or shrink the model")
    print(
        f"[shoal] largest micro-batch {r['largest_batch']}; for a global batch of {r['target_batch']}: "
        f"data.batch_size={r['data.batch_size']} train.grad_accum_steps={r['train.grad_accum_steps']}"
    )
    print(f"[shoal] report: {out / 'report.json'}; plot: {r['plot']}")
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from pathlib import Path

    from shoal import rundir
    from shoal.optim import plot_schedule

    out = Path(args.out) if args.out else rundir.resolve(cfg) / "schedule.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    lr, momentum = plot_schedule(cfg, out)
    extra = f", momentum {min(momentum):.3g}-{max(momentum):.3g}" if momentum else ""
    print(f"[shoal] {cfg.schedule.name}: lr {min(lr):.3g}-{max(lr):.3g} over {len(lr)} steps{extra}; plot: {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.report import write

    print(f"[shoal] report: {write(Path(args.run_dir))}")
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from shoal.lrfind import run

    result = run(cfg, args.min_lr, args.max_lr, args.steps)
    print(
        f"[shoal] suggested optim.lr={result['suggested_lr']:.3g} (loss lowest at {result['min_loss_lr']:.3g}); plot: {result['plot']}"
    )
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if args.seeds < 1:
        raise ShoalError(f"--seeds: must be >= 1 (got {args.seeds})")
    from shoal.sweep import markdown, run

    report = run(cfg, args.grid, args.seeds, args.parallel)
    print(markdown(report["table"]))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.export import export
    from shoal.trained import resolve

    path = resolve(Path(args.checkpoint))
    done = export(path, Path(args.out), args.format, overwrite=args.overwrite)
    checked = (
        f"; outputs match PyTorch's on {done['samples']} validation samples ({done['runtime']}, max |diff| "
        f"{done['max_abs_diff']:.2g} <= {done['tolerance']:.2g})"
        if done.get("checked")
        else (f"; not run: {done['runtime']}" if "runtime" in done and done["runtime"] != "weights" else "")
    )
    print(f"[shoal] wrote {done['path']} ({done['format']} of {path}){checked}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.compress import Options, run

    try:
        sparsities = [float(s) for s in args.sparsity.split(",") if s.strip()]
    except ValueError:
        raise ShoalError(f"--sparsity: expected numbers like 0.5 or 0.3,0.5 (got {args.sparsity!r})") from None
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise ShoalError(f"--sparsity: each value must be in [0, 1) (got {bad[0]:g})")
    if not sparsities and not args.quantize:
        raise ShoalError("shoal compress: give --sparsity and/or --quantize")
    if args.finetune < 0:
        raise ShoalError(f"--finetune: must be >= 0 (got {args.finetune})")
    opts = Options(
        sparsities=sparsities,
        method="structured" if args.structured else "unstructured",
        scope="layer" if args.per_layer else "global",
        quantize=args.quantize,
        finetune_steps=args.finetune,
        overrides=list(args.overrides),
    )
    report = run(
        Path(args.source),
        Path(args.out) if args.out else None,
        opts,
        say=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print((Path(report["plot"]).parent / "report.md").read_text())
    print(f"[shoal] report: {Path(report['plot']).parent / 'report.md'}")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.data.writer import ShardOptions, load_source, parse_bytes, write_shards

    if not 0 <= args.val_fraction < 1:
        raise ShoalError(f"--val-fraction: must be in [0, 1) (got {args.val_fraction})")
    table = load_source(
        args.source,
        num_samples=args.num_samples,
        input_shape=args.input_shape,
        num_classes=args.num_classes,
        task=args.task,
        seq_len=args.seq_len,
        label_column=args.label_column,
        image_size=tuple(args.image_size) if args.image_size else None,
        seed=args.seed,
    )
    opts = ShardOptions(
        samples_per_shard=args.samples_per_shard,
        bytes_per_shard=parse_bytes(args.bytes_per_shard) if args.bytes_per_shard else None,
        block_size=args.block_size,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
    )
    manifest = write_shards(table, Path(args.out_dir), opts, source=args.source)
    for split, info in manifest["splits"].items():
        print(f"[shoal] {split}: {info['samples']:,} samples in {len(info['shards'])} shards")
    print(f"[shoal] wrote {Path(args.out_dir) / 'manifest.json'}")
    return 0


def _cmd_reference(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shoal.config import config_reference

    if not args.update:
        sys.stdout.write(config_reference())
        return 0
    path = Path(args.update)
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise ShoalError(f"{path}: no {start} ... {end} markers to write between")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + config_reference() + end + rest.split(end, 1)[1])
    return 0


def _check_resume(args: argparse.Namespace, cfg) -> None:
    if args.resume and not cfg.run.dir:
        from shoal.errors import ConfigError

        raise ConfigError("--resume needs the run to continue: set run.dir", key="run.dir")


def _exit_code(summary: dict) -> int:
    status = summary.get("status")
    if status == "completed":
        return 0
    if status == "preempted":
        print(
            f"[shoal] preempted at step {summary.get('steps')}: checkpoint saved; continue with --resume run.dir={summary.get('run_dir')}",
            flush=True,
        )
        return int(summary.get("exit_code") or 143)  # also on ranks that did not get the signal themselves
    return 1


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_resume(args, cfg)
    from shoal.check.task import before_run
    from shoal.launcher import run

    before_run(cfg, lambda line: print(line, file=sys.stderr, flush=True))

    summary = run(cfg, resume=args.resume)
    _print_result(summary)
    return _exit_code(summary)


def _cmd_worker(args: argparse.Namespace) -> int:
    cfg = _load(args)
    import threading

    from shoal.dist import WorldInfo
    from shoal.progress import Progress
    from shoal.signals import StopOnSignal
    from shoal.worker import run_worker, setup_logging

    _check_resume(args, cfg)
    from shoal.preflight import check_trackers

    check_trackers(cfg)
    world = WorldInfo.from_env()
    setup_logging(world.rank if world.distributed else None)
    from shoal.check.task import before_run

    before_run(cfg, (lambda line: print(line, file=sys.stderr, flush=True)) if world.is_main else (lambda line: None))
    progress = Progress(cfg.train.max_steps, cfg.log.progress, cfg.log.print_every_s) if world.is_main else None
    stop = threading.Event()
    try:
        with StopOnSignal(stop) as signals:
            summary = run_worker(cfg, resume=args.resume, report=progress.update if progress else None, stop=stop)
    finally:
        if progress is not None:
            progress.close()
    summary["exit_code"] = signals.exit_code
    if world.is_main:
        _print_result(summary)
    if world.is_main:
        return _exit_code(summary)
    return {"completed": 0, "preempted": signals.exit_code or 143}.get(summary.get("status"), 1)


def _print_result(summary: dict) -> None:
    parts = [f"status {summary.get('status')}", f"steps {summary.get('steps')}"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        if isinstance(summary.get(key), float):
            parts.append(f"{key} {summary[key]:.4f}")
    if "samples_per_s" in summary:
        parts.append(f"{summary['samples_per_s']:,.0f} samples/s")
    print("[shoal] " + "  ".join(parts), flush=True)
    print(f"[shoal] run directory: {summary.get('run_dir')}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shoal` console script and `python -m shoal`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow the options (`shoal compress RUN --sparsity 0.9 scaling.num_workers=2`)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except ShoalError as e:
        print(f"shoal: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr, flush=True)
        return 130
