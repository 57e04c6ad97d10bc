"""The operator config: the shipped file is valid, and every bad-config case is one precise line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundation.errors import ConfigError
from inspector.config import (
    GenTLCamera,
    InspectorConfig,
    load_config,
    masked_dump,
    read_secret,
    resolve_sku,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "inspector.toml"

MINIMAL = """\
active_sku = "widget-a"
[skus.widget-a]
model_dir = "skus/widget-a"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inspector.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_the_embedded_default() -> None:
    config = load_config(SHIPPED)
    assert config.camera.type == "synthetic"
    assert config.engine.backend == "onnxruntime"
    assert config.mqtt.host == "127.0.0.1"
    assert config.active_sku in config.skus
    assert config.topic_root == "inspector/line1/station1"


def test_minimal_config_fills_defaults_and_resolves_paths_next_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    sku = config.skus["widget-a"]
    assert sku.model_dir == tmp_path / "skus/widget-a"
    assert sku.calibration_path() == tmp_path / "skus/widget-a/calibration.json"
    assert config.mqtt.spool_dir == tmp_path / "var/spool"
    assert sku.schedule_override() == {}


def test_config_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTOR_CONFIG", str(write(tmp_path, MINIMAL)))
    assert load_config().active_sku == "widget-a"


def test_env_overrides_nested_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTOR_MQTT__HOST", "10.1.2.3")
    monkeypatch.setenv("INSPECTOR_ENGINE__BATCH", "4")
    config = load_config(write(tmp_path, MINIMAL + '[mqtt]\nhost = "broker"\nport = 1884\n'))
    assert config.mqtt.host == "10.1.2.3"
    assert config.mqtt.port == 1884
    assert config.engine.batch == 4


def test_camera_union_picks_the_model_by_type(tmp_path: Path) -> None:
    text = MINIMAL + '[camera]\ntype = "gentl"\ncti = "/opt/x.cti"\nserial = "42"\ntrigger = "hardware"\n'
    camera = load_config(write(tmp_path, text)).camera
    assert isinstance(camera, GenTLCamera)
    assert camera.serial == "42"


def test_sku_schedule_overrides(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL + "steps1 = 2\nsteps2 = 3\n"))
    assert config.skus["widget-a"].schedule_override() == {"steps1": 2, "steps2": 3}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "[mqtt]\nhots = 'x'\n", "mqtt.hots: unknown key"),
        (MINIMAL + "[mqtt]\nport = 'high'\n", "mqtt.port: Input should be a valid integer"),
        (MINIMAL + "roi = [1, 2, 3]\n", "skus.widget-a.roi"),
        (MINIMAL + "roi = [0, 0, -5, 10]\n", "skus.widget-a.roi: Value error, expected [x, y, width, height]"),
        (MINIMAL.replace('"widget-a"\n[', '"widget-b"\n['), "active_sku: "),
        (MINIMAL + "[camera]\ntype = 'gige'\n", "camera: unknown camera type 'gige'"),
        (MINIMAL + "[camera]\ntype = 'folder'\n", "camera.path: required key is missing"),
        (MINIMAL + "[engine]\nbackend = 'openvino'\n", "engine.backend: Input should be"),
        (MINIMAL + "[engine]\nprecision = 'fp16'\n", "engine.precision: Input should be 'fp32' or 'int8'"),
        (MINIMAL + "[engine]\nbackend = 'tensorrt'\nthreads = 2\n", "engine.threads: unknown key"),
        (MINIMAL + "[engine]\nbackend = 'torch'\nprecision = 'bf16'\n", "engine: Value error, precision 'bf16' needs"),
        ("active_sku = 'x'\n", "skus: required key is missing"),
        (MINIMAL + "[mqtt\nhost = 1\n", "TOML syntax error"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_unknown_active_sku_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"active_sku: .*'nope'.*known: widget-a"):
        load_config(write(tmp_path, MINIMAL.replace('active_sku = "widget-a"', 'active_sku = "nope"')))


def test_missing_file_says_how_to_point_at_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found .*--config"):
        load_config(tmp_path / "absent.toml")


def test_resolve_sku_unknown_is_config_error(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert resolve_sku(config, "widget-a").model_dir.name == "widget-a"
    with pytest.raises(ConfigError, match=r"unknown SKU .gadget.*widget-a"):
        resolve_sku(config, "gadget")


def test_secret_file_must_not_be_world_readable(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=r"world-readable.*chmod 640"):
        read_secret(secret, "mqtt.password_file")
    os.chmod(secret, 0o640)
    assert read_secret(secret, "mqtt.password_file") == "s3cret"


def test_a_secret_that_is_binary_or_a_folder_is_one_line_naming_the_key(tmp_path: Path) -> None:
    binary = tmp_path / "token"
    binary.write_bytes(b"\xff\xfe raw random bytes")
    folder = tmp_path / "token.d"
    folder.mkdir(mode=0o750)
    os.chmod(binary, 0o600)
    with pytest.raises(ConfigError, match=r"web\.token_file: secret file .*token cannot be read \(not UTF-8 text\)"):
        read_secret(binary, "web.token_file")
    with pytest.raises(ConfigError, match=r"web\.token_file: .*token\.d cannot be read \(Is a directory\)"):
        read_secret(folder, "web.token_file")


def test_masked_dump_never_contains_the_password(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    os.chmod(secret, 0o600)
    config = load_config(write(tmp_path, MINIMAL + f'[mqtt]\nusername = "st1"\npassword_file = "{secret}"\n'))
    assert config.mqtt.password() == "hunter2"
    assert "hunter2" not in repr(masked_dump(config))


def test_config_model_forbids_unknown_top_level_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="colour: unknown key"):
        load_config(write(tmp_path, MINIMAL.replace("[skus", "colour = 1\n[skus")))
    assert InspectorConfig.model_config["extra"] == "forbid"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inspector.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_cli_config_check_of_the_shipped_config_before_make_demo_names_the_missing_sku(tmp_path: Path) -> None:
    copy = tmp_path / "inspector.toml"
    copy.write_text(SHIPPED.read_text())  # relative paths now resolve under tmp_path, where no demo SKU was made
    result = run_cli("config", "check", "--config", str(copy))
    assert result.returncode == 2 and result.stdout == ""
    problem, summary = result.stderr.strip().splitlines()
    assert problem == (f"error: skus.demo-brick.model_dir = {tmp_path}/var/demo/sku does not exist; train the SKU "
                       "(inspector train --sku demo-brick) or fix the path")
    assert summary.startswith(f"error: {copy}: 1 problem(s)")


@pytest.mark.parametrize(
    "text", [MINIMAL + "[mqtt]\nhots = 'x'\n", MINIMAL + "[mqtt\n", "active_sku = 'x'\n[skus.y]\nmodel_dir='d'\n"]
)
def test_cli_config_check_rejects_with_one_line_and_exit_2(tmp_path: Path, text: str) -> None:
    result = run_cli("config", "check", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr


def test_cli_missing_config_file_exit_2() -> None:
    result = run_cli("config", "check", "--config", "/nonexistent/inspector.toml")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: /nonexistent/inspector.toml: config file not found (pass --config FILE or set INSPECTOR_CONFIG)"
    )


def test_the_committed_configuration_reference_is_what_the_models_say() -> None:
    from inspector.config_reference import REFERENCE, render

    assert REFERENCE.read_text() == render(), "run `inspector config reference > docs/configuration.md`"


def test_a_key_without_a_description_cannot_enter_the_reference() -> None:
    from pydantic import BaseModel

    from inspector.config_reference import table

    class Undocumented(BaseModel):
        depth: int = 3

    with pytest.raises(ValueError, match=r"Undocumented\.depth has no description"):
        table(Undocumented)
