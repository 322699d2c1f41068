"""Command line: ``strato-peft [run] --config FILE ...`` and subcommands.

``python main.py`` is the same program; it keeps the product spec's flags working.
Subcommands are one dict (name -> ``module:function``), imported lazily so that
``--help`` and config errors answer before torch is imported. Each function takes
the list of remaining arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

from strato_peft.registry import did_you_mean

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("strato_peft.commands.run:main", "train or dry-run one experiment (the default)"),
    "score": ("strato_peft.commands.score:main", "score a JSONL file of predictions (no model)"),
    "eval": ("strato_peft.commands.eval:main", "evaluate a run folder's adapter on its task"),
    "run-experiments": ("strato_peft.commands.analysis:run_experiments", "run configs x seeds"),
    "compare": ("strato_peft.commands.analysis:compare", "verdicts against LoRA (table)"),
    "stats": ("strato_peft.commands.analysis:stats", "seed statistics, t-test, bootstrap CI"),
    "visualize": ("strato_peft.commands.analysis:visualize", "figures of a results folder"),
    "report": ("strato_peft.commands.analysis:report", "HTML + Markdown report"),
    "analyze-profile": ("strato_peft.commands.analysis:analyze_profile", "top profiler ops"),
    "analyze-logs": ("strato_peft.commands.analysis:analyze_logs", "summarise a training.log"),
}

log = logging.getLogger("strato_peft")


def build_run_parser(prog: str = "strato-peft run") -> argparse.ArgumentParser:
    """The spec's flags: ``--config FILE [--seed N] [--platform ...] [--dry-run] ...``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run one STRATO-PEFT experiment (or validate it and report its cost with --dry-run).",
    )
    parser.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (overrides 'seed')")
    parser.add_argument(
        "--platform",
        choices=["auto", "cuda", "rocm", "mps", "cpu"],
        default=None,
        help="override device_info.device_type",
    )
    parser.add_argument("--debug", action="store_true", help="verbose logs")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, build the model on the meta device, print the cost report",
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: one JSON object")
    parser.add_argument("--no-wandb", action="store_true", help="disable Weights & Biases")
    parser.add_argument("--profile", action="store_true", help="torch.profiler window each epoch")
    parser.add_argument(
        "--fast-dev-run", action="store_true", help="a handful of steps on a slice of the data"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in its folder")
    parser.add_argument(
        "--resume-anyway", action="store_true",
        help="reuse or resume a run folder whose run used a different config (without it "
        "such a folder is refused, naming the keys that differ)",
    )  # fmt: skip
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="set a config value (YAML-parsed); repeatable, e.g. --override peft.rank=8",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY.PATH=VALUE",
        help="bare overrides, as in Hydra or torchtune (peft.rank=8), the same as --override",
    )
    return parser


def setup_logging(debug: bool) -> None:
    """Rich logging on stderr (stdout stays clean for ``--json``); ``--debug`` adds DEBUG."""
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[
            RichHandler(console=Console(stderr=True), show_path=debug, rich_tracebacks=debug)
        ],
        force=True,
    )
    if not debug:
        # transformers 5 deprecation noise from inside peft; --debug shows it.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _dispatch(name: str, argv: list[str]) -> int:
    target, _ = SUBCOMMANDS[name]
    module_name, _, function = target.partition(":")
    entry = getattr(importlib.import_module(module_name), function)
    return int(entry(argv))


def _usage() -> str:
    lines = [
        "usage: strato-peft [run] --config FILE [options]",
        "       strato-peft COMMAND ...",
        "",
    ]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "'strato-peft COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``strato-peft`` and ``main.py``; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return EXIT_OK if args else EXIT_USAGE
    if args[0].startswith("-") or "=" in args[0]:  # flags or a bare key=value: a run
        return _dispatch("run", args)
    if args[0] not in SUBCOMMANDS:
        hint = did_you_mean(args[0], tuple(SUBCOMMANDS))
        print(f"strato-peft: unknown command '{args[0]}'{hint}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    return _dispatch(args[0], args[1:])


if __name__ == "__main__":
    sys.exit(main())
