"""SKU versions on a running station (inspector/activation.py): the `versions`, `activate` and `rollback` commands
through the daemon's changeover, the version in the status and /metrics, against a real mosquitto and a real
version store holding copies of the session's random-weight calibrated SKU.

The first tests use test_service's BrightnessEngine (seconds each), with a load that can be held, to pin down the
order of operations and how activations meet changeovers; the slow ones run real ONNX Runtime engines on the
synthetic camera and count every frame's verdict across the activations.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from inspector.broker import LocalBroker
from inspector.config import InspectorConfig, load_config
from inspector.pipeline import ActiveSku
from inspector.service import Daemon
from inspector.skustore import Provenance, SkuStore
from inspector.web.metrics import StationMetrics
from tdad.manifest import file_sha256
from tests.stations import write_station
from tests.test_bundle import run_cli
from tests.test_pipeline import ListSource, part
from tests.test_service import Subscriber, brightness_loader
from tests.test_skustore import variant
from tests.test_web import metric
from tests.test_web_browser import write_token
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

LOCAL = Provenance(origin="local", source="test", actor="tester")


@dataclass
class Store:
    """The station's version store: SKU "part" with versions v1 (active), v2 and v3; SKU "other" with v1 (active)
    and v2; and the folder of SKU "plain", which does not run from the store."""

    store: SkuStore
    v1: str
    v2: str
    v3: str
    plain: Path

    def active(self) -> str | None:
        return self.store.active("part")

    def actions(self) -> list[tuple[str, str | None, str]]:
        """part's history after its first activation: (action, from, to)."""
        return [(e.action, e.before, e.after) for e in self.store.history("part")[4:]]


@pytest.fixture
def versions(random_calibrated_sku: Path, tmp_path: Path) -> Store:
    store = SkuStore(tmp_path / "store")
    ids = [store.add_version("part", variant(random_calibrated_sku, tmp_path / f"v{i}", f"version {i}"), LOCAL)
           for i in range(1, 3)]
    bundle = Provenance(origin="bundle", source="/home/ops/bundles/part-3.tar.gz", actor="installer",
                        details={"signed_by": "line-key-1"})
    ids.append(store.add_version("part", variant(random_calibrated_sku, tmp_path / "v3", "version 3"), bundle))
    store.activate("part", ids[0], actor="installer")
    for i in ids[:2]:
        store.add_version("other", store.path("part", i), LOCAL)
    store.activate("other", ids[0], actor="installer")
    return Store(store, *ids, variant(random_calibrated_sku, tmp_path / "plain", "not in the store"))


def station_config(tmp_path: Path, port: int, plain: Path, **tables: dict[str, Any]) -> InspectorConfig:
    """SKUs part and other from the store, plain from a folder; part inspects (tables: tests/stations.py)."""
    return load_config(write_station(
        tmp_path / "inspector.toml", port=port, line_id="L1", station_id="S1", active="part",
        skus={"part": {"model_dir": "store/part/active"}, "other": {"model_dir": "store/other/active"},
              "plain": {"model_dir": plain}},
        archive={"enabled": False}, store={"dir": "store"}, **tables))


class HeldLoads:
    """A BrightnessEngine sku_loader that records each load's (SKU, version folder) and holds every load after the
    first until `release` is set."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, str]] = []
        self.release = threading.Event()
        self._loader = brightness_loader()

    def __call__(self, config: InspectorConfig, name: str) -> ActiveSku:
        self.loads.append((name, config.skus[name].model_dir.name))
        if len(self.loads) > 1:
            self.release.wait(60)
        return self._loader(config, name)


@pytest.fixture
def station(tmp_path: Path, broker: LocalBroker, versions: Store) -> Iterator[tuple[Daemon, HeldLoads, Subscriber]]:
    """A started daemon on part v1 (parts every 20 ms) with held loads, and a subscriber on its topics."""
    config = station_config(tmp_path, broker.port, versions.plain)
    loads = HeldLoads()
    daemon = Daemon(config, source=ListSource([part()] * 20000, interval_s=0.02), sku_loader=loads)
    sub = Subscriber(broker.port, config.topic_root)
    daemon.start()
    try:
        yield daemon, loads, sub
    finally:
        loads.release.set()
        daemon.stop()
        sub.close()


def web(daemon: Daemon, command: dict[str, Any]) -> dict[str, Any]:
    """A command the station page's way: the final reply, the sender recorded as the page's client."""
    return daemon.handle_command(command, loading_reply=False, client="web 127.0.0.1")


def replies(sub: Subscriber, ident: str) -> Callable[[], list[dict[str, Any]]]:
    """The /cmd/reply messages answering command id `ident`, in order."""
    return lambda: [r for r in sub.json("cmd/reply") if r.get("id") == ident]


def test_refusals_are_one_line_and_change_nothing(station: tuple[Daemon, HeldLoads, Subscriber],
                                                  versions: Store) -> None:
    daemon, loads, sub = station
    refused = [
        ({"cmd": "activate", "sku": "plain", "version": versions.v2},
         "SKU 'plain' does not run from the version store: skus.plain.model_dir = "),
        ({"cmd": "activate", "sku": "nope", "version": versions.v2}, "unknown SKU 'nope'"),
        ({"cmd": "activate", "sku": "part"}, 'activate needs {"sku": NAME, "version": ID}'),
        ({"cmd": "activate", "sku": "part", "version": "../v1"}, "is not a version id"),
        ({"cmd": "activate", "sku": "part", "version": "0123456789abcdef"},
         f"has no version 0123456789abcdef in the store {versions.store.root} (its versions: {versions.v1}, "),
        ({"cmd": "activate", "sku": "part", "version": versions.v1},
         f"version {versions.v1} is active already (inspecting); nothing to do"),
        ({"cmd": "activate", "sku": "part", "version": versions.v2, "reason": "x" * 201}, '"reason" must be a string'),
        ({"cmd": "rollback", "sku": "part"}, f"no version was active before {versions.v1}"),
        ({"cmd": "versions", "sku": "plain"}, "SKU 'plain' does not run from the version store"),
    ]
    for command, error in refused:
        reply = web(daemon, command)
        assert not reply["ok"] and error in reply["error"] and "\n" not in reply["error"], (command, reply)
    sub.send(json.dumps({"cmd": "activate", "sku": "part", "version": versions.v1, "id": "mqtt"}))
    assert sub.wait_for(lambda: bool(replies(sub, "mqtt")()))
    assert [r["ok"] for r in replies(sub, "mqtt")()] == [False]  # refused at once: no "loading" reply first
    assert versions.active() == versions.v1 and versions.actions() == []
    assert loads.loads == [("part", versions.v1)] and daemon.running.sku.version == versions.v1

    listed = web(daemon, {"cmd": "versions"})
    assert listed["ok"] and (listed["sku"], listed["active"], listed["running"]) == ("part", versions.v1, versions.v1)
    assert [(v["id"], v["active"], v["origin"]) for v in listed["versions"]] == [
        (versions.v1, True, "local"), (versions.v2, False, "local"), (versions.v3, False, "bundle")]
    assert listed["versions"][0]["provenance"] == "test, added by tester"
    # the page shows this to every viewer: the bundle's name, not the folder on the box it came from
    assert listed["versions"][2]["provenance"] == "part-3.tar.gz, signed by line-key-1, added by installer"


def test_activate_reloads_the_inspecting_sku_and_meets_changeovers_in_order(
        station: tuple[Daemon, HeldLoads, Subscriber], versions: Store) -> None:
    """While v2 loads (held): a changeover to part, the SKU inspecting, is answered at once and leaves the reload
    alone; a second activation is refused; part's old engine inspects. Then v2 goes live, and a rollback
    reloads v1."""
    daemon, loads, sub = station
    sub.send(json.dumps({"cmd": "activate", "sku": "part", "version": versions.v2, "operator": "anna",
                         "reason": "ECO-118", "id": "act"}))
    assert sub.wait_for(lambda: len(replies(sub, "act")()) == 1)
    assert replies(sub, "act")()[0] == {"id": "act", "cmd": "activate", "ok": True, "sku": "part",
                                        "version": versions.v2, "state": "loading"}
    assert wait_until(lambda: loads.loads[-1:] == [("part", versions.v2)])
    assert versions.active() == versions.v2  # the link swaps before the load; v1 still inspects
    assert web(daemon, {"cmd": "sku", "sku": "part"}) == {"cmd": "sku", "ok": True, "sku": "part",
                                                          "state": "active", "load_s": 0.0}
    again = web(daemon, {"cmd": "activate", "sku": "part", "version": versions.v3})
    assert not again["ok"] and "an activation of SKU 'part' is under way" in again["error"]
    other = web(daemon, {"cmd": "activate", "sku": "other", "version": versions.v2})
    assert not other["ok"] and "under way" in other["error"]
    frames = daemon.running.stats.snapshot()["frames"]
    assert wait_until(lambda: daemon.running.stats.snapshot()["frames"] >= frames + 5)
    assert daemon.running.sku.version == versions.v1

    loads.release.set()
    assert sub.wait_for(lambda: len(replies(sub, "act")()) == 2)
    final = replies(sub, "act")()[1]
    assert {k: final[k] for k in ("ok", "sku", "version", "from", "state")} == {
        "ok": True, "sku": "part", "version": versions.v2, "from": versions.v1, "state": "active"}
    assert daemon.running.sku.version == versions.v2
    assert daemon.running.sku.content_hash == next(v.hash for v in versions.store.versions("part")
                                                   if v.id == versions.v2)
    assert sub.wait_for(lambda: sub.json("status")[-1].get("sku_version") == versions.v2)

    back = web(daemon, {"cmd": "rollback", "sku": "part", "operator": "bob"})
    assert {k: back[k] for k in ("ok", "version", "from", "state")} == {
        "ok": True, "version": versions.v1, "from": versions.v2, "state": "active"}
    assert daemon.running.sku.version == versions.v1 == versions.active()
    assert loads.loads == [("part", versions.v1), ("part", versions.v2), ("part", versions.v1)]
    history = versions.store.history("part")[4:]
    assert [(e.action, e.before, e.after, e.actor, e.reason) for e in history] == [
        ("activate", versions.v1, versions.v2, "mqtt (anna)", "ECO-118"),
        ("rollback", versions.v2, versions.v1, "web 127.0.0.1 (bob)", "")]


def test_a_changeover_to_another_sku_supersedes_the_reload_and_the_link_goes_back(
        station: tuple[Daemon, HeldLoads, Subscriber], versions: Store) -> None:
    daemon, loads, sub = station
    sub.send(json.dumps({"cmd": "activate", "sku": "part", "version": versions.v2, "id": "act"}))
    assert wait_until(lambda: loads.loads[-1:] == [("part", versions.v2)])
    sub.send(json.dumps({"sku": "other", "id": "plc"}))
    assert sub.wait_for(lambda: len(replies(sub, "act")()) == 2)
    final = replies(sub, "act")()[1]
    assert not final["ok"] and final["version"] == versions.v2
    assert "superseded by the changeover to 'other'" in final["error"]
    assert final["error"].endswith(f"version {versions.v1} is active again")
    assert versions.active() == versions.v1
    assert versions.actions()[-1][0] == "rollback" and "did not go live" in versions.store.history("part")[-1].reason
    loads.release.set()
    assert sub.wait_for(lambda: any(r.get("state") == "active" for r in replies(sub, "plc")()))
    assert daemon.running.sku.name == "other" and daemon.running.sku.version == versions.v1
    assert all(s.get("sku_version") != versions.v2 for s in sub.json("status"))  # part v2 never inspected


def test_activating_a_sku_that_does_not_inspect_loads_it_at_its_next_changeover(
        station: tuple[Daemon, HeldLoads, Subscriber], versions: Store) -> None:
    """While the activation works (held here on the store's lock, as by a concurrent `inspector sku`), a changeover
    to that SKU is refused; then the version is active, not loaded, and the next changeover loads it."""
    daemon, loads, sub = station
    lock = os.open(versions.store.root / "other" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sub.send(json.dumps({"cmd": "activate", "sku": "other", "version": versions.v2, "id": "act"}))
        assert sub.wait_for(lambda: len(replies(sub, "act")()) == 1)
        refused = web(daemon, {"cmd": "sku", "sku": "other"})
        assert not refused["ok"] and "SKU 'other' is being activated" in refused["error"]
    finally:
        os.close(lock)
    assert sub.wait_for(lambda: len(replies(sub, "act")()) == 2)
    reply = replies(sub, "act")()[1]
    assert {k: reply[k] for k in ("ok", "sku", "version", "from", "state")} == {
        "ok": True, "sku": "other", "version": versions.v2, "from": versions.v1, "state": "ready"}
    assert versions.store.active("other") == versions.v2 and len(loads.loads) == 1  # nothing loaded
    loads.release.set()
    assert web(daemon, {"cmd": "sku", "sku": "other"})["state"] == "active"
    assert loads.loads[-1] == ("other", versions.v2) and daemon.running.sku.version == versions.v2


def test_status_and_metrics_name_the_version_that_runs(station: tuple[Daemon, HeldLoads, Subscriber],
                                                      versions: Store) -> None:
    daemon, loads, _ = station
    loads.release.set()
    metrics = StationMetrics(daemon.status)
    hashes = {v.id: v.hash for v in versions.store.versions("part")}

    def bundle_series() -> list[dict[str, str]]:
        """The labels of each inspector_sku_bundle_info sample (each of value 1)."""
        lines = [line for line in metrics.exposition().decode().splitlines()
                 if line.startswith("inspector_sku_bundle_info{")]
        assert all(line.endswith("} 1.0") for line in lines)
        return [dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in lines]

    status = daemon.status()
    assert (status["sku_version"], status["sku_hash"]) == (versions.v1, hashes[versions.v1])
    assert metric(metrics.exposition().decode(), "inspector_sku_bundle_info", sku="part", version=versions.v1,
                  hash=hashes[versions.v1]) == 1
    assert web(daemon, {"cmd": "activate", "sku": "part", "version": versions.v3})["ok"]
    assert bundle_series() == [{"sku": "part", "version": versions.v3, "hash": hashes[versions.v3]}]  # v1's is gone
    assert web(daemon, {"cmd": "sku", "sku": "plain"})["ok"]
    meta = file_sha256(versions.plain / "meta.json")
    assert (daemon.status()["sku_version"], daemon.status()["sku_hash"]) == ("", meta)
    assert bundle_series() == [{"sku": "plain", "version": "", "hash": meta}]


def free_port() -> int:
    """A TCP port nothing listens on now (for a station page at a fixed web.port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_cli_activates_live_through_the_station_page(tmp_path: Path, broker: LocalBroker, versions: Store,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    token = write_token(tmp_path / "web.token", "cli-live-token-0123456789")
    port = free_port()
    config = station_config(tmp_path, broker.port, versions.plain,
                            web={"enabled": True, "port": port, "token_file": token})
    toml = ("--config", str(tmp_path / "inspector.toml"))
    daemon = Daemon(config, source=ListSource([part()] * 20000, interval_s=0.02), sku_loader=brightness_loader())
    daemon.start()
    try:
        code, out, err = run_cli(capsys, "sku", "activate", "--live", "--sku", "part", versions.v2, "--reason",
                                 "ECO-9", *toml)
        assert code == 0 and f"SKU part: version {versions.v2} inspects (was {versions.v1}; loaded in" in out, err
        assert daemon.running.sku.version == versions.v2 == versions.active()

        # swapped offline, the link names v3 while v2 inspects: --live of v3 makes the daemon load it
        code, out, _ = run_cli(capsys, "sku", "activate", "--sku", "part", versions.v3, *toml)
        assert code == 0 and f"inspector sku activate --live --sku part {versions.v3}" in out
        assert daemon.running.sku.version == versions.v2
        code, out, _ = run_cli(capsys, "sku", "activate", "--live", "--sku", "part", versions.v3, *toml)
        assert code == 0 and f"version {versions.v3} inspects (was {versions.v2};" in out

        code, _, err = run_cli(capsys, "sku", "activate", "--live", "--sku", "part", versions.v3, *toml)
        assert code == 2 and err.count("\n") == 1 and f"version {versions.v3} is active already (inspecting)" in err
        code, out, _ = run_cli(capsys, "sku", "rollback", "--live", "--sku", "part", *toml)
        assert code == 0 and f"version {versions.v2} inspects (was {versions.v3};" in out
    finally:
        daemon.stop()
    assert [(e.action, e.actor) for e in versions.store.history("part")[4:]] == [
        ("activate", f"web 127.0.0.1 ({getpass.getuser()})"), ("activate", getpass.getuser()),
        ("rollback", f"web 127.0.0.1 ({getpass.getuser()})")]
    code, _, err = run_cli(capsys, "sku", "rollback", "--live", "--sku", "part", *toml)
    assert code == 2 and err.count("\n") == 1
    assert f"no station page answers at http://127.0.0.1:{port}/api/cmd" in err


# ---- real engines ----------------------------------------------------------------------------------------------


@pytest.fixture
def onnx_station(tmp_path: Path, broker: LocalBroker, versions: Store) -> Iterator[tuple[Daemon, Subscriber]]:
    """A daemon on part v1 with ONNX Runtime engines and the synthetic camera at 10 parts/s."""
    config = station_config(tmp_path, broker.port, versions.plain,
                            camera={"type": "synthetic", "width": 64, "height": 64, "fps": 10.0, "seed": 5})
    daemon = Daemon(config)
    sub = Subscriber(broker.port, config.topic_root)
    daemon.start()
    try:
        yield daemon, sub
    finally:
        sub.close()


def stop_and_count(daemon: Daemon, sub: Subscriber) -> None:
    """Stop the daemon; every acquired frame got exactly one verdict, in order."""
    assert daemon.stop()
    acquired = daemon.running.stats.snapshot()["acquired"]
    assert sub.wait_for(lambda: len(sub.json("verdict")) >= acquired)
    assert [v["frame_id"] for v in sub.json("verdict")] == list(range(1, acquired + 1))


@pytest.mark.slow
def test_a_version_activated_live_inspects_with_no_frame_lost(onnx_station: tuple[Daemon, Subscriber],
                                                             versions: Store) -> None:
    daemon, sub = onnx_station
    try:
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= 5, 60)
        sub.send(json.dumps({"cmd": "activate", "sku": "part", "version": versions.v2, "id": "act"}))
        assert sub.wait_for(lambda: len(replies(sub, "act")()) == 2, 120)
        assert [r["state"] for r in replies(sub, "act")()] == ["loading", "active"]
        assert sub.wait_for(lambda: sub.json("status")[-1].get("sku_version") == versions.v2, 30)
        seen = len(sub.json("verdict"))
        assert sub.wait_for(lambda: len(sub.json("verdict")) >= seen + 5, 60)  # v2 inspects

        sub.send(json.dumps({"cmd": "rollback", "sku": "part", "id": "back"}))
        assert sub.wait_for(lambda: len(replies(sub, "back")()) == 2, 120)
        assert replies(sub, "back")()[1]["version"] == versions.v1 == versions.active()
        assert sub.wait_for(lambda: sub.json("status")[-1].get("sku_version") == versions.v1, 30)
    finally:
        stop_and_count(daemon, sub)
    assert versions.actions() == [("activate", versions.v1, versions.v2), ("rollback", versions.v2, versions.v1)]


@pytest.mark.slow
def test_a_version_that_fails_preflight_or_load_never_replaces_the_running_one(
        onnx_station: tuple[Daemon, Subscriber], versions: Store) -> None:
    daemon, sub = onnx_station
    v2, v3 = (versions.store.path("part", v) for v in (versions.v2, versions.v3))
    for path in (v2 / "calibration.json", v3 / "segmenter.onnx"):  # installed files are read-only
        os.chmod(path, 0o644)
    (v2 / "calibration.json").unlink()  # v2 fails the pre-flight
    (v3 / "segmenter.onnx").write_bytes(b"not an onnx graph")  # v3 passes it, then fails to load

    def inspecting() -> bool:
        seen = len(sub.json("verdict"))
        return sub.wait_for(lambda: len(sub.json("verdict")) >= seen + 3, 60) and \
            daemon.running.sku.version == versions.v1

    try:
        assert inspecting()
        refused = web(daemon, {"cmd": "activate", "sku": "part", "version": versions.v2})
        assert not refused["ok"] and "calibration.json does not exist" in refused["error"]
        assert f"version {versions.v2} fails the pre-flight, version {versions.v1} stays active" in refused["error"]
        assert versions.active() == versions.v1 and versions.actions() == []
        assert inspecting()

        failed = web(daemon, {"cmd": "activate", "sku": "part", "version": versions.v3})
        assert not failed["ok"] and failed["error"].startswith(f"version {versions.v3} did not go live: ")
        assert failed["error"].endswith(f"version {versions.v1} is active again") and "\n" not in failed["error"]
        assert versions.active() == versions.v1
        assert versions.actions() == [("activate", versions.v1, versions.v3), ("rollback", versions.v3, versions.v1)]
        assert "did not go live" in versions.store.history("part")[-1].reason
        assert inspecting()
    finally:
        stop_and_count(daemon, sub)
