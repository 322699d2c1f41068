"""``strato-peft run`` / ``python main.py``: one experiment, or its dry run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from strato_peft.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, build_run_parser, setup_logging
from strato_peft.config import ConfigError, ExperimentConfig, load_config

log = logging.getLogger("strato_peft")


def flag_overrides(args: object) -> list[str]:
    """Config overrides implied by command-line flags (applied after ``--override``)."""
    overrides = []
    if getattr(args, "platform", None):
        overrides.append(f"device_info.device_type={args.platform}")  # type: ignore[attr-defined]
    if getattr(args, "no_wandb", False):
        overrides.append("logging.wandb=false")
    if getattr(args, "profile", False):
        overrides.append("logging.profile=true")
    if getattr(args, "debug", False):
        overrides.append("logging.level=DEBUG")
    return overrides


def _platform_note(config: ExperimentConfig) -> str:
    from strato_peft.platform import PlatformError, select_platform

    try:
        platform = select_platform(config.device_info)
    except PlatformError as exc:
        return f"{config.device_info.device_type} (not usable here: {exc})"
    return f"{platform.name} ({platform.device_name}), {platform.precision}"


def main(argv: list[str]) -> int:
    """Parse the spec's flags, load the config, then dry-run or train."""
    parser = build_run_parser()
    args = parser.parse_intermixed_args(argv)  # bare overrides anywhere among the flags
    setup_logging(args.debug)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.json and not args.dry_run:
        parser.error("--json goes with --dry-run")
    bare = [item for item in args.overrides if "=" not in item]
    if bare:
        parser.error(f"unexpected argument {bare[0]!r}: a bare override is KEY.PATH=VALUE")
    overrides = [*args.override, *args.overrides, *flag_overrides(args)]
    try:
        config = load_config(args.config, overrides, seed=args.seed)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from strato_peft.methods import MethodError
    from strato_peft.models import ModelLoadError
    from strato_peft.platform import PlatformError
    from strato_peft.tasks.base import DataError
    from strato_peft.tasks.sandbox import SandboxUnavailable

    try:
        if args.dry_run:
            return _dry_run(config, as_json=args.json)
        return _train(config, args)
    except (
        ModelLoadError, MethodError, PlatformError, DataError, SandboxUnavailable, ValueError
    ) as exc:  # fmt: skip
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _dry_run(config: ExperimentConfig, as_json: bool) -> int:
    from strato_peft.dry_run import dry_run_report, format_report

    report = dry_run_report(config, platform_note=_platform_note(config))
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(format_report(report))
    return EXIT_OK


def _train(config: ExperimentConfig, args: argparse.Namespace) -> int:
    from strato_peft.training.run import RunOptions, run_experiment

    folder = run_experiment(
        config,
        RunOptions(
            fast_dev_run=args.fast_dev_run,
            resume=args.resume,
            profile=args.profile,
            resume_anyway=args.resume_anyway,
        ),
    )
    if int(os.environ.get("RANK", "0")) == 0:  # one line, also under accelerate launch
        print(folder)
    return EXIT_OK
