"""The command line: every subcommand has --help, the top level imports no heavy module, and a torchrun rank's
process ends without the interpreter's finalization."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from inspector.cli import COMMANDS, build_parser, main


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in [*COMMANDS, "config"]:
        assert name in out


def test_top_level_parser_imports_neither_torch_nor_onnxruntime() -> None:
    code = (
        "import sys; from inspector.cli import build_parser; build_parser(None);"
        "import inspector.config;"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'cv2') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser(command).parse_args([command, "--help"])
    assert info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_train_help_puts_the_operators_options_first_and_explains_every_option() -> None:
    import argparse

    parser = build_parser("train")
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    train = sub.choices["train"]
    groups = [g.title for g in train._action_groups if g._group_actions]
    assert groups[1:3] == ["what to train", "what the line knows (settings are chosen from these)"], groups
    assert {"model capacity (the presets set these)", "memory prior (the presets set these)",
            "schedule (the presets set these)", "research and ablation (for an ML engineer)"} <= set(groups)
    silent = [a.option_strings[0] for a in train._actions if a.option_strings and not a.help]
    assert silent == [], f"options without a one-line help: {silent}"


@pytest.mark.parametrize("world", ["2", "1", None])
def test_a_torchrun_rank_ends_after_its_exit_handlers_and_output_without_the_interpreters_finalization(
        world: str | None) -> None:
    code = ("import atexit\n"
            "from inspector.cli import exit_process\n"
            "class Finalized:\n"
            "    def __del__(self): print('finalized', flush=True)\n"
            "kept = Finalized()\n"
            "atexit.register(print, 'exit handlers ran')\n"
            "print('buffered output')\n"
            "exit_process(3)\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | ({} if world is None else {"WORLD_SIZE": world})
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    finalized = [] if world == "2" else ["finalized"]
    assert done.stdout.splitlines() == ["buffered output", "exit handlers ran", *finalized]
