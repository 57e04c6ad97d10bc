"""deploy/: the install script in a throw-away root, and the systemd unit checked by systemd-analyze."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from inspector.config import load_config

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "deploy" / "install.sh"
UNIT = REPO / "deploy" / "inspector@.service"
STATION = "station7"
MAX_EXPOSURE = 1.5  # what the unit scored before the station page; new features must not raise it

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (apt-get install systemd)"
)


def run_install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run deploy/install.sh with DESTDIR=root; fail the test with its output when it fails."""
    env = {**os.environ, "DESTDIR": str(root)}
    done = subprocess.run(
        ["bash", str(INSTALL), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def snapshot(root: Path) -> dict[str, tuple[str, str]]:
    """Every path under root with its mode and content hash (or link target): what idempotency compares."""
    tree: dict[str, tuple[str, str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = "-> " + os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = ""
        tree[str(path.relative_to(root))] = (stat.filemode(info.st_mode), content)
    return tree


def mode(path: Path) -> int:
    """Permission bits of path."""
    return stat.S_IMODE(path.stat().st_mode)


def unit_directives(text: str) -> dict[str, list[str]]:
    """Directives of a unit file, key -> values in order (systemd allows repeated keys)."""
    directives: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key, []).append(value)
    return directives


def test_install_script_parses() -> None:
    """bash -n catches syntax errors without running anything."""
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing (apt-get install shellcheck)")
def test_shell_scripts_pass_shellcheck() -> None:
    """All deploy scripts are shellcheck-clean."""
    scripts = sorted(str(p) for p in (REPO / "deploy").rglob("*.sh"))
    done = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout


@pytest.mark.integration
def test_install_lays_out_the_box(tmp_path: Path) -> None:
    """A fresh install creates the directories with tight modes, the unit and a valid starter config."""
    run_install(tmp_path, "--station", STATION, "--no-venv")
    etc = tmp_path / "etc" / "inspector"
    lib = tmp_path / "var" / "lib" / "inspector"
    assert mode(etc) == 0o750
    assert mode(etc / "secrets") == 0o700
    for sub in ("", "spool", "archive", "skus"):
        assert mode(lib / STATION / sub) == 0o750
    assert mode(etc / f"{STATION}.toml") == 0o640
    assert mode(etc / f"{STATION}.env") == 0o640
    assert (tmp_path / "etc" / "systemd" / "system" / "inspector@.service").read_text() == UNIT.read_text()

    config = load_config(etc / f"{STATION}.toml")
    assert config.line.station_id == STATION
    assert config.mqtt.spool_dir == Path(f"/var/lib/inspector/{STATION}/spool")
    assert config.archive.dir == Path(f"/var/lib/inspector/{STATION}/archive")
    assert config.store.dir == Path(f"/var/lib/inspector/{STATION}/skus")  # writable by the sandboxed service
    assert all(sku.model_dir.is_relative_to("/var/lib/inspector/skus") for sku in config.skus.values())
    token = etc / "secrets" / f"{STATION}.web-token"
    assert mode(token) == 0o600 and len(token.read_text().strip()) == 48
    web = config.web
    assert web.enabled and web.host == "127.0.0.1" and not web.open_view and web.port == 8080
    assert web.token_file == Path(f"/etc/inspector/secrets/{STATION}.web-token")


@pytest.mark.integration
def test_install_sets_the_station_page_port_and_refuses_a_bad_one(tmp_path: Path) -> None:
    run_install(tmp_path, "--station", STATION, "--no-venv", "--web-port", "8093")
    assert load_config(tmp_path / "etc" / "inspector" / f"{STATION}.toml").web.port == 8093
    done = subprocess.run(["bash", str(INSTALL), "--station", "s2", "--no-venv", "--web-port", "80a"],
                          env={**os.environ, "DESTDIR": str(tmp_path / "other")}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "--web-port '80a'" in done.stderr


@pytest.mark.integration
def test_install_twice_changes_nothing(tmp_path: Path) -> None:
    """Idempotent: the second run leaves every path, mode and content as the first left it."""
    run_install(tmp_path, "--station", STATION, "--no-venv")
    first = snapshot(tmp_path)
    run_install(tmp_path, "--station", STATION, "--no-venv")
    assert snapshot(tmp_path) == first


@pytest.mark.integration
def test_install_never_overwrites_a_config(tmp_path: Path) -> None:
    """An operator's edited config and env file survive a re-install."""
    run_install(tmp_path, "--station", STATION, "--no-venv")
    config = tmp_path / "etc" / "inspector" / f"{STATION}.toml"
    env = tmp_path / "etc" / "inspector" / f"{STATION}.env"
    config.write_text('active_sku = "edited"\n')
    env.write_text("INSPECTOR_LOG_LEVEL=debug\n")
    done = run_install(tmp_path, "--station", STATION, "--no-venv")
    assert config.read_text() == 'active_sku = "edited"\n'
    assert env.read_text() == "INSPECTOR_LOG_LEVEL=debug\n"
    assert "keeping existing" in done.stdout


@pytest.mark.integration
def test_uninstall_keeps_configs_and_data_unless_purged(tmp_path: Path) -> None:
    """--uninstall removes the program and unit; --purge also removes configs, secrets and data."""
    run_install(tmp_path, "--station", STATION, "--no-venv")
    secret = tmp_path / "etc" / "inspector" / "secrets" / f"{STATION}.password"
    secret.write_text("s3cret\n")
    spooled = tmp_path / "var" / "lib" / "inspector" / STATION / "spool" / "0001.json"
    spooled.write_text("{}")

    run_install(tmp_path, "--uninstall")
    assert not (tmp_path / "etc" / "systemd" / "system" / "inspector@.service").exists()
    assert not (tmp_path / "opt" / "tdad-inspector").exists()
    assert secret.exists() and spooled.exists()
    assert (tmp_path / "etc" / "inspector" / f"{STATION}.toml").exists()

    run_install(tmp_path, "--uninstall", "--purge")
    assert not (tmp_path / "etc" / "inspector").exists()
    assert not (tmp_path / "var" / "lib" / "inspector").exists()


@pytest.mark.integration
def test_install_rejects_a_bad_station_name(tmp_path: Path) -> None:
    """Station names become unit instances, paths and broker users: no slashes or spaces."""
    done = subprocess.run(
        ["bash", str(INSTALL), "--station", "../etc", "--no-venv"],
        env={**os.environ, "DESTDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--station" in done.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.integration
def test_real_root_install_creates_user_and_owners(tmp_path: Path) -> None:
    """Without DESTDIR: the user is created and owners set; --purge removes them again.

    Runs in a private mount namespace over copies of /etc, /opt and /var, with /run/systemd hidden, so
    the host's user database and systemd are never touched.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create a mount namespace here")
    subprocess.run(["cp", "-a", "/etc", str(tmp_path / "etc")], check=True, timeout=60)
    for sub in ("opt", "var/lib", "var/cache"):
        (tmp_path / sub).mkdir(parents=True)
    owned = ["/etc/inspector", "/etc/inspector/secrets", f"/etc/inspector/{STATION}.toml", "/var/lib/inspector"]
    owned += [f"/var/lib/inspector/{STATION}", f"/var/lib/inspector/{STATION}/spool"]
    script = f"""set -e
        for d in etc opt var/lib var/cache; do mount --bind {tmp_path}/$d /$d; done
        if [ -d /run/systemd ]; then mount -t tmpfs none /run/systemd; fi
        bash {INSTALL} --station {STATION} --no-venv >/dev/null
        stat -c '%n %U:%G %a' {" ".join(owned)}
        bash {INSTALL} --uninstall --purge >/dev/null
        if getent passwd inspector; then echo 'user still there'; exit 1; fi
    """
    done = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    owners = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert owners == {
        "/etc/inspector": "root:inspector 750",
        "/etc/inspector/secrets": "inspector:inspector 700",
        f"/etc/inspector/{STATION}.toml": "root:inspector 640",
        "/var/lib/inspector": "root:inspector 750",
        f"/var/lib/inspector/{STATION}": "inspector:inspector 750",
        f"/var/lib/inspector/{STATION}/spool": "inspector:inspector 750",
    }


def test_unit_has_the_service_contract() -> None:
    """The directives the daemon and operations guide rely on."""
    unit = unit_directives(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["10s"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["inspector"]
    assert unit["ExecStart"] == ["/opt/tdad-inspector/venv/bin/inspector run --config /etc/inspector/%i.toml"]
    assert unit["EnvironmentFile"] == ["-/etc/inspector/%i.env"]
    assert unit["StateDirectory"] == ["inspector/%i"]
    assert unit["DevicePolicy"] == ["closed"]
    assert unit["CapabilityBoundingSet"] == [""]


@pytest.mark.integration
@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify on the installed tree (stub executables, the host's system units)."""
    run_install(tmp_path, "--station", STATION, "--no-venv")
    commands = [v for k, vs in unit_directives(UNIT.read_text()).items() if k.startswith("Exec") for v in vs]
    for command in commands:
        exe = tmp_path / command.split()[0].lstrip("-@:+!").lstrip("/")
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    system_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system_units, tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)

    done = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", f"inspector@{STATION}.service"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@pytest.mark.integration
@needs_systemd_analyze
def test_unit_exposure_is_low() -> None:
    """systemd-analyze security rates the unit's exposure at most 1.5 ("OK"; 4.0 would be the limit of OK)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout


def plant_files(tmp_path: Path) -> list[str]:
    """--plant-* options with stand-in certificate files (the installer copies them; tests/test_bridge.py uses real
    ones)."""
    args = []
    for option, name in (("ca", "plant-ca.crt"), ("cert", "s.crt"), ("key", "s.key")):
        (tmp_path / name).write_text(f"{option}\n")
        args += [f"--plant-{option}", str(tmp_path / name)]
    return args


@pytest.mark.integration
def test_install_renders_the_plant_bridge(tmp_path: Path) -> None:
    """--plant-broker: the bridge conf for this station's topics, the TLS files in place, a starter config at QoS 2;
    idempotent; commands come in only with --plant-cmd; --purge removes it all."""
    root = tmp_path / "root"
    run_install(root, "--station", STATION, "--no-venv", "--plant-broker", "plant.example", *plant_files(tmp_path))
    conf = root / "etc" / "mosquitto" / "conf.d" / f"inspector-bridge-{STATION}.conf"
    lines = [line for line in conf.read_text().splitlines() if line and not line.startswith("#")]
    assert "address plant.example:8883" in lines
    assert f"remote_clientid inspector-bridge-line1-{STATION}" in lines
    assert "cleansession false" in lines and "bridge_attempt_unsubscribe false" in lines
    topics = [line for line in lines if line.startswith("topic ")]
    root_topic = f"inspector/line1/{STATION}/"
    assert topics == [f"topic {t} out 2 {root_topic} {root_topic}" for t in ("verdict", "reject", "mask", "status",
                                                                             "cmd/reply")]
    assert not any("@" in line for line in lines), "every placeholder is filled"
    plant = root / "etc" / "mosquitto" / "inspector" / "plant"
    assert f"bridge_keyfile /etc/mosquitto/inspector/plant/{STATION}.key" in lines
    assert (mode(plant), mode(plant / "ca.crt"), mode(plant / f"{STATION}.key")) == (0o750, 0o644, 0o600)
    assert (plant / f"{STATION}.key").read_text() == "key\n"
    assert load_config(root / "etc" / "inspector" / f"{STATION}.toml").mqtt.qos == 2

    first = snapshot(root)
    run_install(root, "--station", STATION, "--no-venv", "--plant-broker", "plant.example", *plant_files(tmp_path))
    assert snapshot(root) == first
    run_install(root, "--station", STATION, "--no-venv", "--plant-broker", "10.1.0.9:8884", *plant_files(tmp_path),
                "--plant-cmd")
    lines = conf.read_text().splitlines()
    assert "address 10.1.0.9:8884" in lines and f"topic cmd in 2 {root_topic} {root_topic}" in lines

    run_install(root, "--uninstall", "--purge")
    assert not conf.exists() and not plant.exists()


@pytest.mark.integration
def test_install_warns_when_an_existing_config_is_not_at_qos_2(tmp_path: Path) -> None:
    """A config written before the bridge keeps its QoS; the installer says what exactly-once needs."""
    run_install(tmp_path, "--station", STATION, "--no-venv")
    done = run_install(tmp_path, "--station", STATION, "--no-venv", "--plant-broker", "plant.example",
                       *plant_files(tmp_path))
    assert "set [mqtt] qos = 2" in done.stdout


@pytest.mark.integration
@pytest.mark.parametrize(("args", "error"), [
    (["--plant-broker", "plant.example:99999"], "the port must be a number from 1 to 65535"),
    (["--plant-broker", "plant example"], "give a host name or IPv4 address"),
    (["--plant-broker", "plant.example"], "--plant-broker needs --plant-ca, --plant-cert and --plant-key"),
    (["--plant-cmd"], "go with --plant-broker"),
])
def test_install_refuses_bad_plant_options(tmp_path: Path, args: list[str], error: str) -> None:
    """One clear line, exit 2, nothing installed."""
    done = subprocess.run(["bash", str(INSTALL), "--station", STATION, "--no-venv", *args],
                          env={**os.environ, "DESTDIR": str(tmp_path / "root")}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and error in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.integration
def test_install_refuses_a_missing_certificate_file(tmp_path: Path) -> None:
    args = plant_files(tmp_path)
    args[args.index("--plant-key") + 1] = str(tmp_path / "absent.key")
    done = subprocess.run(["bash", str(INSTALL), "--station", STATION, "--no-venv", "--plant-broker", "p.example",
                           *args], env={**os.environ, "DESTDIR": str(tmp_path / "root")}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2 and f"--plant-key '{tmp_path / 'absent.key'}': no such readable file" in done.stderr


def test_prometheus_example_labels_every_station_with_its_line() -> None:
    """deploy/prometheus: prometheus.yml scrapes the targets of stations.yml, each with the line and station labels
    deploy/grafana/inspector-plant.json selects by. A structural check of the files' fixed shape: PyYAML is not in
    the project's environment and promtool is not installed here."""
    prometheus = (REPO / "deploy" / "prometheus" / "prometheus.yml").read_text()
    stations = (REPO / "deploy" / "prometheus" / "stations.yml").read_text()
    for text in (prometheus, stations):
        assert "\t" not in text, "YAML indents with spaces only"
    config = [line for line in prometheus.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    job = config.index("  - job_name: tdad-inspector")
    assert config[job + 1:job + 5] == ["    metrics_path: /metrics", "    scheme: http", "    file_sd_configs:",
                                       '      - files: ["stations.yml"]']
    entries = [line for line in stations.splitlines() if line.strip() and not line.startswith("#")]
    pattern = re.compile(r'- targets: \["[\w.-]+:\d+"(, "[\w.-]+:\d+")*\]\n'
                         r"  labels: \{line: [\w.-]+, station: [\w.-]+\}")
    pairs = ["\n".join(entries[i:i + 2]) for i in range(0, len(entries), 2)]
    assert pairs and all(pattern.fullmatch(pair) for pair in pairs), pairs
    dashboard = json.loads((REPO / "deploy" / "grafana" / "inspector-plant.json").read_text())
    assert {variable["name"] for variable in dashboard["templating"]["list"]} == {"line", "station", "sku"}
