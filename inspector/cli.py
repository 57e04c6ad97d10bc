"""`inspector`: the command line of the daemon, training, engines and calibration.

Subcommands are built lazily: only the module of the chosen subcommand is imported, so `inspector --help`
and `inspector config check` start in a fraction of a second without torch. Operator mistakes
(InspectorError) are printed as one line and exit 2; nothing an operator can cause shows a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from foundation.errors import InspectorError

EXIT_OPERATOR_ERROR = 2
EXIT_INTERRUPTED = 130

# name -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("inspector.service", "run the inspection daemon (camera -> engine -> verdicts over MQTT)"),
    "train": ("inspector.commands.train", "train a SKU's TDAD model from good images"),
    "export": ("inspector.commands.export", "export a SKU's networks to ONNX"),
    "build": ("inspector.commands.build", "build TensorRT engines (.plan) from a SKU's ONNX graphs"),
    "calibrate": ("inspector.commands.calibrate", "fit a SKU's decision thresholds from good (and NG) parts"),
    "eval": ("inspector.commands.evaluate", "measure a SKU's model on a labelled test set (AUROC, AUPRO)"),
    "bench": ("inspector.commands.bench", "benchmark latency and throughput per backend"),
    "demo": ("inspector.demo", "train a demo SKU and run the daemon on synthetic parts"),
    "review": ("inspector.commands.review", "operator reviews of archived parts: export them as a labelled test set"),
    "sku": ("inspector.commands.sku", "signed SKU bundles and the version store: keygen, pack, install, list, "
                                      "activate, rollback"),
}


def config_parent() -> argparse.ArgumentParser:
    """The --config flag, as a parent parser for every command and for the actions of a command group."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="inspector.toml to use (default: $INSPECTOR_CONFIG, else ./inspector.toml)",
    )
    return parent


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s module is imported to add its own arguments."""
    parent = config_parent()
    parser = argparse.ArgumentParser(
        prog="inspector", description="tdad-inspector: TDAD visual inspection on the line", parents=[parent]
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, parents=[parent])
        if name == command:
            importlib.import_module(module).add_arguments(sub_parser)
    config = sub.add_parser("config", help="inspect the operator configuration", parents=[parent])
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    config_sub.add_parser(
        "check", help="validate inspector.toml, check every file and directory it names, print it resolved",
        parents=[parent]
    )
    config_sub.add_parser("reference", help="print the configuration reference (docs/configuration.md) as markdown")
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    """The first word of argv that names a subcommand (option values never do)."""
    return next((word for word in argv if word in COMMANDS), None)


def config_check(args: argparse.Namespace) -> int:
    """Validate the config, run the pre-flight checks (inspector/preflight.py) and print the config resolved
    (secrets masked) as JSON; each problem is one line with its fix, and any problem exits 2."""
    from inspector.config import config_path, load_config, masked_dump
    from inspector.preflight import check

    config = load_config(args.config)
    problems = check(config)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"error: {config_path(args.config)}: {len(problems)} problem(s); fix them and run "
              "`inspector config check` again", file=sys.stderr)
        return EXIT_OPERATOR_ERROR
    print(json.dumps(masked_dump(config), indent=2))
    print(f"ok: {config_path(args.config)} is valid and every file and directory it names is in place",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `inspector` command line: runs the chosen subcommand and returns its exit status (console exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen_command(argv))
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)
    try:
        if args.command == "config" and args.config_command == "reference":
            from inspector.config_reference import render

            print(render(), end="")
            return 0
        if args.command == "config":
            return config_check(args)
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args))
    except InspectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OPERATOR_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. A torchrun rank (WORLD_SIZE > 1) runs the exit handlers and flushes its output,
    then leaves by os._exit, without the interpreter's finalization: torch's DistributedDataParallel keeps the rank's
    process group alive past destroy_process_group, and a gloo worker thread of it still dropping a finished
    collective's tensors while the interpreter finalizes aborts the process (SIGABRT), failing a run that wrote its
    SKU."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def console() -> NoReturn:
    """The `inspector` console script: main(), then exit_process with its exit status."""
    exit_process(main())


if __name__ == "__main__":
    console()
