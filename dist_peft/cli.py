"""``dist-peft``: train and export.

    dist-peft train --config FILE [--resume [CHECKPOINT]] [--set train.steps=10 ...] [--launcher mpi]
                    [--log-level INFO] [--log-ranks all]
    dist-peft export --checkpoint DIR --out DIR [--merged]
    dist-peft precompute --config FILE [--set KEY=VALUE ...]
    dist-peft plan (--config FILE | --model PRESET ...) --gpus N [--gpu h100-80gb] [--search]
    dist-peft profile --config FILE [--config FILE2 | --methods lora,loca] [--steps N] [--out DIR] ...
    dist-peft compare --config COMPARE.yaml [--set KEY=VALUE ...]

A bad config or file ends the command with one ``error:`` line (exit code 2), before any model is built; any other
exception with ``error: Type: message`` and its traceback (exit code 1). The console is ``logs.py``'s: in a job,
rank 0 speaks and every line of another rank's warning or error starts with ``[rank R]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

import yaml

from dist_peft import logs
from dist_peft.files import BadFileError, StorageError
from dist_peft.parallel.runtime import LaunchError, mpi_job, shutdown, name_deepspeed_accelerator
from dist_peft.train.config import ConfigError
from dist_peft.train.guards import StepFaultError


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair}: expected KEY=VALUE, e.g. train.steps=10")
        out[key] = yaml.safe_load(value)
    return out


def _train(args: argparse.Namespace) -> dict:
    from dist_peft.train.config import check_world_size, load_config

    cfg = load_config(args.config, _overrides(args.set))
    logs.rank_files(cfg.output.dir)  # --log-ranks: this rank's log to output.dir/logs/rank{R}.log

    def fits(world: int) -> None:
        check_world_size(cfg, world)

    # mpi: rank, world and master from mpi4py (checked against the config first); an error aborts every rank
    with mpi_job(fits) if args.launcher == "mpi" else contextlib.nullcontext():
        fits(int(os.environ.get("WORLD_SIZE", "1")))  # the launcher's world, before the heavy imports
        from dist_peft.accounting.plan import preflight
        from dist_peft.train.loop import Trainer

        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # preset ≡ weights folder; the layout fits the GPU

        # train.resume (auto: the newest verified checkpoint, so a restarted job continues); --resume overrides it
        summary = Trainer(cfg, resume=args.resume or cfg.train.resume).run()
        shutdown()
        return summary


def _export(args: argparse.Namespace) -> dict:
    from dist_peft.train.export import export

    return {"exported": str(export(args.checkpoint, args.out, merged=args.merged)), "merged": args.merged}


def _precompute(args: argparse.Namespace) -> dict:
    """The method's one-time model-wide work (``Adapter.prepare``; FRoD: the HJD bases, written to their cache)."""
    from dist_peft.integrations.transformers import adapted_sites, inject_adapters
    from dist_peft.train.config import load_config
    from dist_peft.train.models import load_model

    cfg = load_config(args.config, _overrides(args.set))
    model, _ = load_model(cfg.model)
    inject_adapters(model, cfg.method.name, cfg.method.options, cfg.method.target_modules)
    return {"precomputed": cfg.method.name, "sites": len(adapted_sites(model))}


def _profile(args: argparse.Namespace) -> dict:
    """Measured steps of one or several configurations (``dist_peft/profile``, docs/profiling.md)."""
    from dist_peft.profile.cli import run_command

    return run_command(args, _overrides(args.set))


def _compare(args: argparse.Namespace) -> dict:
    """Every entry of a compare file × its seeds, resumably, then ``report.md`` (``dist_peft/compare``)."""
    from dist_peft.compare.runs import run_compare
    from dist_peft.compare.spec import load_spec

    return run_compare(load_spec(args.config, _overrides(args.set)))


def _plan(args: argparse.Namespace) -> dict:
    """Bytes per rank, FLOPs, collectives and predicted throughput of a run (``dist_peft/accounting``)."""
    from dist_peft.accounting.cli import run_command

    return run_command(args, _overrides(args.set))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-peft", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune with a YAML config")
    t.add_argument("--config", required=True)
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint folder (default: the run's newest verified one; without the "
                        "flag, train.resume decides: auto by default)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by some launchers
    t.add_argument("--launcher", choices=("env", "mpi"), default="env",
                   help="env: torchrun / deepspeed / srun set RANK, WORLD_SIZE, ... (default); mpi: under mpirun, "
                        "derive them with mpi4py (launch/mpirun.sh)")
    t.add_argument("--log-level", type=str.upper, choices=logs.LEVELS,
                   help=f"rank 0's console level (default ${logs.LEVEL_ENV}, else INFO); other ranks show warnings "
                        "and errors only, each line prefixed with its rank")
    t.add_argument("--log-ranks", metavar="all|R[,R...]",
                   help="also write these ranks' logs at the log level to output.dir/logs/rank{R}.log")
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="write adapter files or merged weights from a checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--merged", action="store_true", help="merge the adapter into the base weights")
    e.set_defaults(func=_export)
    c = sub.add_parser("precompute", help="run a method's one-time preparation (FRoD: HJD bases to the cache)")
    c.add_argument("--config", required=True)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    c.set_defaults(func=_precompute)
    from dist_peft.profile.cli import add_arguments

    pr = sub.add_parser("profile", help="measure training steps: phases, throughput, FLOPs/MFU, collectives, memory")
    add_arguments(pr)
    pr.set_defaults(func=_profile)
    from dist_peft.accounting.cli import add_arguments as plan_arguments

    pl = sub.add_parser("plan", help="size a run before launch: bytes per rank, FLOPs, collectives, step time")
    plan_arguments(pl)
    pl.set_defaults(func=_plan)
    cm = sub.add_parser("compare", help="run several methods × seeds on one model and data; report and claims")
    cm.add_argument("--config", required=True, help="a compare file (configs/compare-smollm2.yaml)")
    cm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of every entry's run config")
    cm.set_defaults(func=_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and data come from packages, never from a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:  # before the heavy imports: their import-time warnings meet the filters (logs.py)
        logs.setup(getattr(args, "log_level", None), getattr(args, "log_ranks", None))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name_deepspeed_accelerator()  # transformers imports DeepSpeed whenever it is installed
    log = logging.getLogger(__name__)
    try:
        result = args.func(args)
    except (ConfigError, BadFileError, FileNotFoundError, LaunchError, StorageError, StepFaultError) as e:
        log.error("%s", e)
        return 2
    except Exception as e:  # a crash: one line naming it (with the rank in a job), then where it happened
        log.error("%s: %s", type(e).__name__, e, exc_info=True)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
