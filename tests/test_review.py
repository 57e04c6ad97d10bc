"""Operator reviews of archived parts: the request rules, the append-only store and its kept copies (the archive's
cap and a restart), the `review` control over HTTP and MQTT against a real daemon (one command path), and the
export as an MVTec AD test split that `inspector calibrate` and `inspector eval` take.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from structlog.testing import capture_logs

from calibration.evaluate import compute_metrics, infer_dataset
from calibration.thresholds import load_calibration
from foundation.errors import ConfigError, DataError
from inspector.archive import Archive, ArchiveItem
from inspector.broker import LocalBroker, start_local_broker
from inspector.cli import main
from inspector.config import InspectorConfig, load_config
from inspector.reviews import (
    REVIEWS_FILE,
    PartNotFound,
    ReviewError,
    ReviewStore,
    export_mvtec,
    parse_review,
    read_reviews,
)
from inspector.service import Daemon
from inspector.verdict import Verdict
from tdad.scoring import image_scores
from tdad.training.data import open_dataset
from tdad.training.sample_data import draw_defect, render_part
from tests.fixtures_data import make_mvtec_tree
from tests.fixtures_engines import copy_sku
from tests.test_pipeline import BrightnessEngine, ListSource, part
from tests.test_service import Subscriber, brightness_loader, write_config
from tests.test_web import token_file
from tests.waiting import wait_until

DEFECT_TYPES = {"brick": ["scratch", "dent"]}


def archive_item(frame_id: int, ok: bool, image: np.ndarray | None = None, sku: str = "brick",
                 score: float = 0.5) -> ArchiveItem:
    """What the pipeline hands the archive for one verdict (a real Verdict's JSON)."""
    verdict = Verdict(frame_id=frame_id, run_id="20261125T101503Z-3f9a1c0b", t_acquired=1_764_000_000.0 + frame_id,
                      sku=sku, ok=ok, score=score, threshold=0.4, engine="test", line="l", station="s")
    if image is None:
        image = np.random.default_rng(frame_id).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    return ArchiveItem(sku=sku, frame_id=frame_id, t_acquired=verdict.t_acquired, ok=ok,
                       verdict=verdict.model_dump(mode="json"), image_u8_hwc=image,
                       map_f32_hw=np.random.default_rng(frame_id).random((16, 16), dtype=np.float32))


def archived(root: Path, items: list[ArchiveItem], max_mb: float = 10.0) -> list[str]:
    """Write items through a real Archive; their part names, in order."""
    archive = Archive(root, max_mb=max_mb).start()
    for item in items:
        assert archive.submit(item)
    archive.stop()
    return [path.relative_to(root).as_posix()[: -len(".json")] for path in reversed(list(archive.parts()))]


def request(part: str, label: str, **more: Any) -> dict[str, Any]:
    return {"cmd": "review", "part": part, "label": label} | more


BAD_REQUESTS = [
    ("no part", {"part": None, "label": "false_reject"}, 'review needs "part"'),
    ("part outside the archive", {"part": "../brick/2026-11-25/101503.123_1_ng", "label": "false_reject"},
     'review needs "part"'),
    ("part in the reviews folder", {"part": "reviews/2026-11-25/101503.123_1_ng", "label": "false_reject"},
     'review needs "part"'),
    ("unknown label", {"label": "meh"}, "unknown review label 'meh': use defect_confirmed, false_reject"),
    ("label not text", {"label": ["false_reject"]}, "unknown review label"),
    ("OK label for an NG part", {"label": "missed_defect"}, "not for an NG part; use defect_confirmed or false_reject"),
    ("type with a good label", {"label": "false_reject", "defect_type": "scratch"}, "goes with a defective label"),
    ("type not in the list", {"label": "defect_confirmed", "defect_type": "crack"},
     "'crack' is not in skus.brick.defect_types (one of scratch, dent)"),
    ("operator too long", {"label": "false_reject", "operator": "x" * 65}, "at most 64 printable characters"),
    ("operator not text", {"label": "false_reject", "operator": ["x"]}, "at most 64 printable characters"),
]


@pytest.mark.parametrize(("fields", "error"), [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
def test_a_bad_review_request_is_one_line_naming_what_is_wrong(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ReviewError) as info:
        parse_review({"cmd": "review", "part": "brick/2026-11-25/101503.123_1_ng"} | fields, DEFECT_TYPES)
    assert error in str(info.value) and "\n" not in str(info.value)


def test_a_good_request_names_the_part_label_type_and_operator() -> None:
    parsed = parse_review(request("brick/2026-11-25/101503.123_17_ok", "missed_defect", defect_type="dent",
                                  operator="  Anna Müller "), DEFECT_TYPES)
    assert (parsed.part, parsed.sku, parsed.label, parsed.defect_type, parsed.operator) == (
        "brick/2026-11-25/101503.123_17_ok", "brick", "missed_defect", "dent", "Anna Müller")
    assert parse_review(request("other/2026-11-25/101503.123_17_ng", "false_reject", operator=" "), {}).operator is None


def test_the_store_appends_keeps_the_files_and_a_later_review_supersedes(tmp_path: Path) -> None:
    ng, ok = archived(tmp_path, [archive_item(1, ok=False), archive_item(2, ok=True)])
    store = ReviewStore(tmp_path)
    first = store.add(parse_review(request(ng, "false_reject", operator="anna"), DEFECT_TYPES), client="web 10.0.0.7")
    assert (first.frame_id, first.verdict_ok, first.score, first.threshold, first.sku) == (1, False, 0.5, 0.4, "brick")
    assert first.run_id == "20261125T101503Z-3f9a1c0b" and first.t.utcoffset() is not None
    store.add(parse_review(request(ng, "defect_confirmed", defect_type="dent"), DEFECT_TYPES), client="mqtt")
    store.add(parse_review(request(ok, "ok_confirmed"), DEFECT_TYPES), client="mqtt")
    lines = [json.loads(line) for line in (tmp_path / "reviews" / REVIEWS_FILE).read_text().splitlines()]
    assert [(r["part"], r["label"], r["client"], r["operator"]) for r in lines] == [
        (ng, "false_reject", "web 10.0.0.7", "anna"), (ng, "defect_confirmed", "mqtt", None),
        (ok, "ok_confirmed", "mqtt", None)]
    for suffix in (".json", ".png", "_heat.png"):  # kept as hard links of the archived files
        assert os.path.samefile(tmp_path / f"{ng}{suffix}", tmp_path / "reviews" / f"{ng}{suffix}")
    latest = {p.review.part: p for p in read_reviews(tmp_path, "brick")}
    assert (latest[ng].review.label, latest[ng].review.defect_type, latest[ng].review.defective) == (
        "defect_confirmed", "dent", True)
    assert latest[ng].image == tmp_path / "reviews" / f"{ng}.png" and not latest[ok].review.defective
    assert read_reviews(tmp_path, "other") == []
    assert ReviewStore(tmp_path).latest() == store.latest()  # what a restarted station reads
    with pytest.raises(PartNotFound, match=r"brick/2026-11-25/101503.123_9_ng is not in the archive"):
        store.add(parse_review(request("brick/2026-11-25/101503.123_9_ng", "false_reject"), {}), client="mqtt")
    assert len((tmp_path / "reviews" / REVIEWS_FILE).read_text().splitlines()) == 3


def test_reviewed_parts_survive_the_archive_cap_and_its_restarts(tmp_path: Path) -> None:
    first, *_ = archived(tmp_path, [archive_item(i, ok=False) for i in (1, 2)])
    ReviewStore(tmp_path).add(parse_review(request(first, "false_reject"), {}), client="mqtt")
    kept = sorted((tmp_path / "reviews").rglob("*.*"))
    assert len(kept) == 4  # the review line and the part's three files
    for restart in range(2):  # the cap runs in this run and in the next one, which indexes what is on disk
        archived(tmp_path, [archive_item(10 * (restart + 1) + i, ok=False) for i in range(8)], max_mb=0.02)
    assert not (tmp_path / f"{first}.json").exists()  # the cap deleted the archived part ...
    assert sorted((tmp_path / "reviews").rglob("*.*")) == kept  # ... and kept every reviewed file
    assert [p.review.part for p in read_reviews(tmp_path)] == [first]
    assert ReviewStore(tmp_path).verdict_file(first) == tmp_path / "reviews" / f"{first}.json"


def test_a_torn_last_line_is_skipped_and_never_swallows_the_next(tmp_path: Path) -> None:
    ng, other = archived(tmp_path, [archive_item(1, ok=False), archive_item(2, ok=False)])
    store = ReviewStore(tmp_path)
    store.add(parse_review(request(ng, "false_reject"), {}), client="mqtt")
    with (tmp_path / "reviews" / REVIEWS_FILE).open("a") as handle:
        handle.write('{"schema_version": 1, "t": "2026-')  # a crash in the middle of a write
    store.add(parse_review(request(other, "defect_confirmed"), {}), client="mqtt")
    with capture_logs() as events:
        assert sorted(p.review.part for p in read_reviews(tmp_path)) == [ng, other]
    assert [(e["event"], e["line"]) for e in events] == [("review_line_skipped", 2)]


# ---- the review control against a real daemon ------------------------------------------------------------


def station_config(tmp_path: Path, port: int, *, max_mb: float = 50.0) -> InspectorConfig:
    """test_service's config of SKUs a, b, nocal with the page, every OK frame archived and defect types for a."""
    config = write_config(tmp_path, port, skus={"a": {"model_dir": "a", "defect_types": ["scratch", "dent"]}},
                          web={"enabled": True, "port": 0, "token_file": token_file(tmp_path)},
                          archive={"ok_sample_rate": 1.0, "max_mb": max_mb})
    assert config.archive.dir == tmp_path / "archive"
    return config


class Page:
    """HTTP to a daemon's station page (the one of tests/test_web.py, reused)."""

    def __init__(self, daemon: Daemon, broker: LocalBroker, sub: Subscriber) -> None:
        from tests.test_web import Station

        self.station = Station(daemon, broker, sub)
        self.daemon = daemon
        self.archive_dir = daemon.config.archive.dir

    def queue(self, **query: str) -> dict[str, Any]:
        return dict(self.station.get_json("/api/reviews?" + "&".join(f"{k}={v}" for k, v in query.items())))

    def review(self, part: str, label: str, **more: Any) -> tuple[int, dict[str, Any]]:
        return self.station.command(request(part, label, **more))

    def lines(self) -> list[dict[str, Any]]:
        path = self.archive_dir / "reviews" / REVIEWS_FILE
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def start_station(config: InspectorConfig, images: list[np.ndarray], interval_s: float = 0.005) -> Daemon:
    daemon = Daemon(config, source=ListSource(images, interval_s=interval_s), sku_loader=brightness_loader())
    daemon.start()
    return daemon


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """A station whose finite source has archived 40 parts (every 4th NG), all written before the tests run."""
    tmp_path = tmp_path_factory.mktemp("review")
    broker = start_local_broker(tmp_path / "broker")
    config = station_config(tmp_path, broker.port)
    daemon = start_station(config, [part(defect_xywh=(5, 5, 12, 12)) if i % 4 == 0 else part() for i in range(40)])
    sub = Subscriber(broker.port, config.topic_root)
    try:
        assert daemon.wait_finished(30)
        archive = daemon.archive
        assert archive is not None
        assert wait_until(lambda: archive.saved + archive.skipped == 40)
        yield Page(daemon, broker, sub)
    finally:
        daemon.stop()
        sub.close()
        broker.stop()


@pytest.mark.integration
def test_the_queue_lists_parts_newest_first_by_kind_with_their_files(page: Page) -> None:
    queue = page.queue()
    assert queue["archive"] and queue["defect_types"] == {"a": ["scratch", "dent"], "b": [], "nocal": []}
    parts = queue["parts"]
    times = [p["verdict"]["t_acquired"] for p in parts]
    assert times == sorted(times, reverse=True)
    assert len(page.queue(show="all")["parts"]) == page.daemon.archive.saved  # type: ignore[union-attr]
    assert {p["verdict"]["ok"] for p in parts} == {True, False} and not any(p["review"] for p in parts)
    assert all(not p["verdict"]["ok"] for p in page.queue(kind="ng")["parts"])
    assert all(p["verdict"]["ok"] for p in page.queue(kind="ok")["parts"])
    newest = parts[0]
    assert newest["json"] == f"archive/{newest['part']}.json"
    for key in ("json", "image", "heat"):
        assert page.station.http("GET", "/" + newest[key])[0] == 200
    status, _, body = page.station.http("GET", "/api/reviews?show=maybe")
    assert status == 400 and b"?show=unreviewed|reviewed|all" in body


def ng_parts(page: Page) -> list[str]:
    return [p["part"] for p in page.queue(kind="ng")["parts"]]


REFUSED = [  # (what, body or fields, headers, status, error); {part}: an NG part not reviewed
    ("missing token", {"label": "false_reject"}, {"authorization": ""}, 401, "missing control token"),
    ("wrong token", {"label": "false_reject"}, {"authorization": "Bearer not-the-token"}, 403, "wrong control token"),
    ("bad label", {"label": "meh"}, {}, 400, "unknown review label 'meh'"),
    ("label for OK parts", {"label": "ok_confirmed"}, {}, 400, "not for an NG part"),
    ("unknown defect type", {"label": "defect_confirmed", "defect_type": "crack"}, {}, 400,
     "not in skus.a.defect_types"),
    ("malformed part", {"part": "a/../../etc/passwd", "label": "false_reject"}, {}, 400, 'review needs "part"'),
    ("unknown part", {"part": "a/2020-01-01/000000.000_1_ng", "label": "false_reject"}, {}, 404,
     "a/2020-01-01/000000.000_1_ng is not in the archive"),
    ("NaN", b'{"cmd": "review", "part": "{part}", "label": "false_reject", "operator": "x", "id": NaN}', {}, 400,
     "NaN is not JSON"),
    ("infinite number", b'{"cmd": "review", "part": "{part}", "label": "false_reject", "id": 1e400}', {}, 400,
     "number 1e400 is out of range"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("command", "headers", "status", "error"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_a_refused_review_is_a_clear_4xx_and_writes_nothing(
        page: Page, command: dict[str, Any] | bytes, headers: dict[str, str], status: int, error: str) -> None:
    target = ng_parts(page)[-1]
    if isinstance(command, bytes):
        body: dict[str, Any] | bytes = command.replace(b"{part}", target.encode())
    else:
        body = {"cmd": "review", "part": target} | command
    before = page.lines()
    got, reply = page.station.command(body, **headers)
    assert (got, reply["ok"]) == (status, False) and error in reply["error"] and "\n" not in reply["error"]
    assert page.lines() == before and target in ng_parts(page)


@pytest.mark.integration
def test_page_and_mqtt_reviews_take_one_command_path_and_the_latest_wins(page: Page) -> None:
    target = ng_parts(page)[0]
    status, reply = page.review(target, "false_reject", operator="anna", id=5)
    assert status == 200 and reply["ok"] and reply["id"] == 5 and reply["cmd"] == "review"
    assert (reply["review"]["part"], reply["review"]["label"], reply["review"]["client"]) == (
        target, "false_reject", "web 127.0.0.1")
    page.station.sub.send(json.dumps(request(target, "defect_confirmed", defect_type="scratch", id="r2")))
    replies = page.station.sub
    assert replies.wait_for(lambda: any(r.get("id") == "r2" for r in replies.json("cmd/reply")))
    mqtt_reply = next(r for r in replies.json("cmd/reply") if r.get("id") == "r2")
    assert mqtt_reply["ok"] and mqtt_reply["review"]["client"] == "mqtt"
    page.station.sub.send(json.dumps(request(target, "missed_defect", id="r3")))  # refused on /cmd just the same
    assert replies.wait_for(lambda: any(r.get("id") == "r3" for r in replies.json("cmd/reply")))
    refused = next(r for r in replies.json("cmd/reply") if r.get("id") == "r3")
    assert not refused["ok"] and "not for an NG part" in refused["error"]

    assert [(r["part"], r["label"], r["defect_type"]) for r in page.lines()[-2:]] == [
        (target, "false_reject", None), (target, "defect_confirmed", "scratch")]
    assert target not in ng_parts(page)
    reviewed = page.queue(show="reviewed")["parts"]
    listed = next(p for p in reviewed if p["part"] == target)
    assert (listed["review"]["label"], listed["review"]["defect_type"]) == ("defect_confirmed", "scratch")
    assert listed["image"] == f"archive/reviews/{target}.png"  # the kept copy
    assert page.station.http("GET", "/" + listed["image"])[0] == 200
    everything = [p["part"] for p in page.queue(show="all")["parts"]]
    assert everything.index(target) > everything.index(ng_parts(page)[0])  # not yet reviewed ones first


@pytest.mark.integration
def test_reviews_and_their_parts_survive_a_restart_and_the_size_cap(tmp_path: Path, broker: LocalBroker) -> None:
    config = station_config(tmp_path, broker.port, max_mb=0.05)
    endless = [part(defect_xywh=(5, 5, 12, 12)), part(), part(), part()] * 25_000  # four arrays, many times
    daemon = start_station(config, endless[:8])
    try:
        assert daemon.wait_finished(30) and wait_until(lambda: daemon.archive is not None and daemon.archive.saved == 8)
        first = Page(daemon, broker, Subscriber(broker.port, config.topic_root))
        target = ng_parts(first)[-1]
        assert first.review(target, "false_reject")[0] == 200
        assert first.review(target, "defect_confirmed", defect_type="dent")[0] == 200
        first.station.sub.close()
    finally:
        daemon.stop()
    daemon = start_station(config, endless, interval_s=0.002)  # a new run: its cap deletes the old parts
    try:
        page = Page(daemon, broker, Subscriber(broker.port, config.topic_root))
        assert wait_until(lambda: not (config.archive.dir / f"{target}.json").exists())
        reviewed = page.queue(show="reviewed")["parts"]
        assert [(p["part"], p["review"]["label"], p["review"]["defect_type"]) for p in reviewed] == [
            (target, "defect_confirmed", "dent")]
        for key in ("json", "image", "heat"):
            assert page.station.http("GET", "/" + reviewed[0][key])[0] == 200
        assert [r["label"] for r in page.lines()] == ["false_reject", "defect_confirmed"]
        status, reply = page.review(target, "false_reject")  # a kept part can be reviewed again
        assert status == 200 and reply["review"]["label"] == "false_reject"
        page.station.sub.close()
    finally:
        daemon.stop()


# ---- the export ----------------------------------------------------------------------------------------


ROI = (8, 4, 64, 64)  # where the part lies in the 80 x 72 frames


def framed(part_rgb: np.ndarray) -> np.ndarray:
    """A part placed at ROI in a grey 80 x 72 frame, as the camera sees it."""
    frame = np.full((72, 80, 3), 90, np.uint8)
    x, y, w, h = ROI
    frame[y:y + h, x:x + w] = part_rgb
    return frame


def reviewed_archive(root: Path, n_good: int = 10, n_defects: int = 6) -> None:
    """An archive of brick parts reviewed as a station would: false rejects and confirmed OK parts (good),
    confirmed defects typed and untyped, and one part archived without a frame."""
    rng = np.random.default_rng(3)
    goods = [framed(render_part("brick", 64, rng)) for _ in range(n_good)]
    defects = [framed(draw_defect(render_part("brick", 64, rng), rng)[0]) for _ in range(n_defects)]
    items = [archive_item(i, ok=i % 2 == 0, image=image) for i, image in enumerate(goods)]
    items += [archive_item(100 + i, ok=False, image=image) for i, image in enumerate(defects)]
    items.append(dataclasses.replace(archive_item(200, ok=False), image_u8_hwc=None))  # a fail-safe without frame
    parts = archived(root, items)
    store = ReviewStore(root)
    for name, item in zip(parts, items, strict=True):
        if item.frame_id < 100:
            label = "ok_confirmed" if item.ok else "false_reject"
            store.add(parse_review(request(name, label), DEFECT_TYPES), client="mqtt")
        else:
            defect_type = {0: "scratch", 1: "dent"}.get(item.frame_id % 3)
            store.add(parse_review(request(name, "defect_confirmed", defect_type=defect_type), DEFECT_TYPES),
                      client="mqtt")


@pytest.mark.slow
def test_the_export_is_an_mvtec_test_split_that_calibrate_and_eval_take(
        trained_sku: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive_dir = tmp_path / "archive"
    reviewed_archive(archive_dir)
    sku = copy_sku(trained_sku, tmp_path / "sku")  # calibrate rewrites its calibration.json
    config = tmp_path / "inspector.toml"
    config.write_text(f'active_sku = "brick"\n[archive]\ndir = "{archive_dir}"\n'
                      f'[skus.brick]\nmodel_dir = "{sku}"\nroi = {list(ROI)}\ndefect_types = ["scratch", "dent"]\n')
    out = tmp_path / "export"
    assert main(["review", "export", "--config", str(config), "--sku", "brick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    test = out / "brick" / "test"
    assert sorted(p.name for p in test.iterdir()) == ["defect", "dent", "good", "scratch"]
    assert len(list((test / "good").iterdir())) == 10
    assert sum(len(list((test / t).iterdir())) for t in ("defect", "dent", "scratch")) == 6
    assert not (out / "brick" / "ground_truth").exists() and not (out / "brick" / "train").exists()
    assert "1  reviewed parts without a frame" in printed
    exported = next((test / "good").iterdir())
    frame = cv2.imread(str(archive_dir / "reviews" / "brick" / exported.name.replace("_", "/", 1)))
    x, y, w, h = ROI
    assert np.array_equal(cv2.imread(str(exported)), frame[y:y + h, x:x + w])  # the kept frame cut to the ROI
    assert main(["review", "export", "--config", str(config), "--sku", "brick", "--out", str(out)]) == 2
    assert "exists; export into a new --out folder" in capsys.readouterr().err

    ng = [arg for t in ("defect", "dent", "scratch") for arg in ("--ng", str(test / t))]
    assert main(["calibrate", "--sku-dir", str(sku), "--good", str(test / "good"), *ng, "--frr", "0.1",
                 "--threads", "1"]) == 0, capsys.readouterr().err
    calibration = load_calibration(sku / "calibration.json")
    assert (calibration.n_good, calibration.n_ng) == (10, 6)
    report_dir = tmp_path / "report"
    assert main(["eval", "--sku-dir", str(sku), "--dataset", "mvtec", "--root", str(out), "--category", "brick",
                 "--threads", "1", "--out", str(report_dir)]) == 0, capsys.readouterr().err
    assert "pixel metrics: not available" in capsys.readouterr().out
    row = json.loads((report_dir / "report.json").read_text())["rows"][0]
    assert row["n_images"] == 16 and row["n_defective"] == 6 and not row["pixel_truth"]
    assert row["image_auroc"] is not None and row["pixel_auroc"] is None and row["aupro"] is None
    assert sorted(row["per_defect_image_auroc"]) == ["defect", "dent", "scratch"]
    assert "Pixel metrics: not available" in (report_dir / "report.md").read_text()


def test_an_export_without_reviews_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no reviews of SKU 'brick' in .*reviews.jsonl: review its parts"):
        export_mvtec(tmp_path, "brick", tmp_path / "out")


@pytest.mark.parametrize(("toml", "error"), [
    ('[skus.a]\nmodel_dir = "a"\ndefect_types = ["scratch", "good"]\n', r"skus.a.defect_types: .*other than 'good'"),
    ('[skus.a]\nmodel_dir = "a"\ndefect_types = ["a/b"]\n', r"skus.a.defect_types: .*folder names"),
    ('[skus.a]\nmodel_dir = "a"\n[skus.reviews]\nmodel_dir = "r"\n', r"skus: .*'reviews' is taken by the archive"),
])
def test_defect_types_and_sku_names_that_would_break_the_reviews_folder_are_config_errors(
        tmp_path: Path, toml: str, error: str) -> None:
    path = tmp_path / "inspector.toml"
    path.write_text(f'active_sku = "a"\n{toml}')
    with pytest.raises(ConfigError, match=error):
        load_config(path)


def test_an_mvtec_split_without_masks_has_image_level_labels_and_no_pixel_metrics(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, n_test_good=2, n_test_bad=4, size=32)
    shutil.rmtree(root / "brick" / "ground_truth")  # what `inspector review export` writes: no masks
    dataset = open_dataset("mvtec", root, "brick", "test", 32)
    assert {(item.defect_type, item.label) for item in dataset} >= {("good", 0), ("blob", 1), ("scratch", 1)}
    assert all(item.mask is None for item in dataset)
    inference = infer_dataset(BrightnessEngine(image_size=32), dataset, batch_size=4)
    assert not inference.pixel_truth
    result = compute_metrics(inference, image_scores(inference.maps, top_k=4))
    assert result["image_auroc"] is not None and not result["pixel_truth"]
    assert all(result[k] is None for k in ("pixel_auroc", "aupro", "pixel_f1_max", "pixel_ap"))
