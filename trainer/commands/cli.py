"""``compactrec`` command line: train, generate, plan, export, ...

``main(argv)`` parses and validates, then calls library functions with config objects only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

from trainer.errors import DataError
from trainer.strict import ConfigError

logger = logging.getLogger("compactrec")


class _DropExpected(logging.Filter):
    """Drops third-party messages that are expected here (data-parallel tables have no sharding spec)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Sharding spec not found")


def _setup_logging(rank: int) -> None:
    """Ours at INFO on rank 0 (WARNING elsewhere); third-party libraries (fbgemm, torchrec) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format=f"[%(asctime)s r{rank} %(levelname)s %(name)s] %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropExpected())
    for name in ("compactrec", "trainer", "embeddings", "sharding", "launch"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    from embeddings import registry

    p = argparse.ArgumentParser(prog="compactrec", description="Compressed-embedding recommendation training on TorchRec")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train and evaluate (inside torchrun/torchx, or launch with --nproc)",
                       description=f"Registered embeddings.kind values: {', '.join(registry.names())}")
    t.add_argument("config", help="YAML preset in configs/")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--nproc", type=int, default=None, help="launch N processes per node as a torchx local_cwd job")
    t.add_argument("--nnodes", type=int, default=1, help="with --nproc: number of (simulated) nodes")
    t.add_argument("--scheduler", default="local_cwd", help="with --nproc: torchx scheduler")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in training.run_dir (training.resume=latest)")

    g = sub.add_parser("generate", help="write a synthetic Criteo-like click log")
    g.add_argument("preset", help="synthetic preset (tiny, small, medium, large, and *-control)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("overrides", nargs="*", help="key=value overrides of the generator config")
    g.add_argument("--overwrite", action="store_true", help="replace a dataset generated with other settings")

    li = sub.add_parser("build-artifact", aliases=["lma-index"],
                        help="build the method's artifact from the training data (LMA: its minhash index) into --out")
    li.add_argument("config")
    li.add_argument("overrides", nargs="*")
    li.add_argument("--out", default=None, help="artifact path (default: the configured one, e.g. "
                    "embeddings.options.index_path)")

    pr = sub.add_parser("prepare", help="build what the config's method needs before training (LMA index), once")
    pr.add_argument("config")
    pr.add_argument("overrides", nargs="*")

    ex = sub.add_parser("export", help="write a checkpoint's model as one inference artifact (fbgemm inference TBE)")
    ex.add_argument("config")
    ex.add_argument("overrides", nargs="*")
    ex.add_argument("--out", required=True, help="output file (e.g. model.pt, or model.pt2 with --format pt2)")
    ex.add_argument("--format", dest="form", default="eager", choices=("eager", "pt2", "aoti"),
                    help="eager: the data-only artifact trainer.serve.artifact.load rebuilds (default); pt2: a "
                         "torch.export program (dense, ids, lengths) -> logits, for torch.export.load; aoti: that "
                         "program compiled with AOTInductor (a .pt2 package for Python or C++)")
    ex.add_argument("--precision", default="fp32", help="embedding table precision: fp32, fp16, int8 or int4")
    ex.add_argument("--checkpoint", default=None,
                    help="checkpoint directory (default: the newest complete one in training.run_dir)")

    sc = sub.add_parser("score", help="score a split with an inference artifact: AUC, logloss, samples/s")
    sc.add_argument("artifact", help="file written by `compactrec export` (eager artifact, --format pt2 program or aoti package)")
    sc.add_argument("overrides", nargs="*", help="data.key=value overrides of the artifact's data section")
    sc.add_argument("--data", default=None, help="dataset directory (default: the one the model was trained on)")
    sc.add_argument("--format", default=None, choices=("tsv", "npy", "npz"), help="data format (default: the artifact's)")
    sc.add_argument("--split", default="val", choices=("val", "test", "day"),
                    help="val / test: the halves of data.eval_day; day: all of it")
    sc.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: data.eval_batch_size)")
    sc.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    sc.add_argument("--predictions", default=None, help="write the logits here (.npy, float32, split order)")
    sc.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                    help="no progress bar (default: shown on a terminal)")
    sc.add_argument("--json", action="store_true", help="print the result as JSON")

    cp = sub.add_parser("compare", help="side-by-side AUC, memory and speed of finished runs")
    cp.add_argument("run_dirs", nargs="+", help="run directories; the first is the reference (e.g. runs/default)")

    pl = sub.add_parser("plan", help="shard the model for a topology without any process group and print the plan")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--world-size", type=int, required=True)
    pl.add_argument("--local-world-size", type=int, required=True)
    pl.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    pl.add_argument("--costs", choices=("offered", "all", "none"), default="offered",
                    help="estimated cost of each candidate placement: of tables offered several (default), all, none")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    rebuild = " ".join(["compactrec prepare", args.config, *args.overrides])
    if args.resume:
        args.overrides = list(args.overrides) + ["training.resume=latest"]
    config = load_config(args.config, args.overrides)
    if args.nproc is not None:
        from trainer.commands.launcher import launch_local
        from trainer.commands.preflight import preflight

        if args.nproc < 1 or args.nnodes < 1:
            raise ValueError(f"--nproc and --nnodes must be >= 1, got {args.nproc} and {args.nnodes}")
        # everything checkable here fails now, as one error line, instead of in every worker after the launch
        for warning in preflight(config, args.nproc * args.nnodes, args.nproc, rebuild):
            print(f"compactrec train: warning: {warning}", file=sys.stderr)
        return launch_local(args.config, args.overrides, nnodes=args.nnodes, nproc_per_node=args.nproc,
                            scheduler=args.scheduler, max_retries=config.launch.max_retries,
                            max_restarts=config.launch.max_restarts)
    from trainer.train.distributed import init_distributed
    from trainer.train.loop import run_training
    from trainer.prepare.run import check_prepared

    check_prepared(config, rebuild)  # names this run's own rebuild command (run_training's check cannot)
    ctx = init_distributed(config.training.device)
    _setup_logging(ctx.rank)
    try:
        run_training(config, ctx)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from trainer.data.synthetic import SyntheticConfig, generate, get_preset
    from trainer.config import parse_override
    from trainer.strict import from_dict

    values = dict(get_preset(args.preset))
    for text in args.overrides:
        if "=" not in text:
            raise ConfigError(f"generator override {text!r} must look like key=value")
        values.update(parse_override(f"x.{text}")["x"])
    cfg = from_dict(SyntheticConfig, values, source=f"preset {args.preset!r}", prefix="generate")
    manifest = generate(cfg, args.out, overwrite=args.overwrite)
    oracle = manifest["oracle"]
    print(f"dataset in {args.out}: {manifest['total_rows']:,} rows over {manifest['num_days']} days "
          f"(eval day {oracle['eval_day']}); oracle AUC val {oracle['val_auc']:.4f} test {oracle['test_auc']:.4f}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.commands.plan import run_plan

    config = load_config(args.config, args.overrides)
    print(run_plan(config, args.world_size, args.local_world_size, args.device, args.costs))
    return 0


def _cmd_build_artifact(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.prepare.run import build_artifact

    config = load_config(args.config, args.overrides)
    print(build_artifact(config, args.out))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.prepare.run import prepare

    print(prepare(load_config(args.config, args.overrides)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.config import load_config
    from trainer.serve.export import export_checkpoint
    from trainer.serve.aoti import export_checkpoint_package
    from trainer.serve.pt2 import export_checkpoint_program

    write = {"pt2": export_checkpoint_program, "aoti": export_checkpoint_package}.get(args.form, export_checkpoint)
    done = write(load_config(args.config, args.overrides), Path(args.out),
                 Path(args.checkpoint) if args.checkpoint else None, precision=args.precision)
    if args.form == "pt2":
        print(f"exported {done['checkpoint']} (step {done['step']}) to {done['path']} as a torch.export program: "
              f"{done['precision']} tables, file {done['file_bytes'] / 2**20:.2f} MiB")
        return 0
    if args.form == "aoti":
        print(f"exported {done['checkpoint']} (step {done['step']}) to {done['path']} as an AOTInductor package: "
              f"{done['precision']} tables, file {done['file_bytes'] / 2**20:.2f} MiB")
        return 0
    print(f"exported {done['checkpoint']} (step {done['step']}) to {done['path']}: {done['precision']} tables "
          f"{done['table_bytes'] / 2**20:.2f} MiB, dense {done['dense_bytes'] / 2**20:.2f} MiB, "
          f"file {done['file_bytes'] / 2**20:.2f} MiB")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import json

    from trainer.serve.score import format_result, run_score

    result = run_score(args.artifact, args.data, args.format, args.split, args.batch_size, list(args.overrides),
                       args.threads, args.progress, args.predictions)
    print(json.dumps(result, indent=1, default=str) if args.json else
          format_result(result, args.artifact, result["data"]["path"]))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from trainer.commands.compare import compare_table

    print(compare_table(args.run_dirs))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(list(argv) if argv is not None else None)
    # overrides may also follow options (`train CONFIG --nproc 2 a.b=c`): collect them, reject the rest
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command != "train":
        _setup_logging(0)
    commands = {"train": _cmd_train, "generate": _cmd_generate, "plan": _cmd_plan, "build-artifact": _cmd_build_artifact, "lma-index": _cmd_build_artifact,
                "compare": _cmd_compare, "prepare": _cmd_prepare, "export": _cmd_export, "score": _cmd_score}
    try:
        return commands[args.command](args)
    except FileExistsError as exc:
        hint = " (command line: --overwrite)" if args.command == "generate" else ""
        print(f"compactrec {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FloatingPointError, DataError) as exc:
        print(f"compactrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    entry()


__all__: List[str] = ["main", "entry"]
