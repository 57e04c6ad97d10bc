"""The command line: every subcommand has --help, and the top level imports no heavy module."""

from __future__ import annotations

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
