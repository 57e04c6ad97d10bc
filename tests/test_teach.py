"""Teaching a SKU good parts without retraining (tdad/training/teach.py): a kind of good part the SKU never saw
reads as anomalous, and after teaching a few of them the unseen rest of that kind reads as normal, while the
memory grows by at most a training image's share per taught image."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation.errors import DataError
from inspector.broker import LocalBroker
from inspector.cli import main
from tdad.manifest import read_manifest
from tdad.model import load_sku
from tdad.scoring import image_scores
from tdad.training.sample_data import render_part, write_good_folder
from tdad.training.teach import COVERED, teach_sku
from tests.fixtures_engines import copy_sku
from tests.test_web_browser import needs_chromium

SIZE = 64


@pytest.fixture(scope="module")
def quick_sku(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick (memory-only) SKU of brick parts at 64 px; read-only, copy it to change it."""
    root = tmp_path_factory.mktemp("teach")
    good = write_good_folder(root / "brick", 24, SIZE, "brick", seed=1)
    out = root / "sku"
    assert main(["train", "--out", str(out), "--data", str(good), "--quick", "--image-size", str(SIZE),
                 "--threads", "1", "--no-select"]) == 0
    return out


def scores(sku: Path, images: np.ndarray) -> np.ndarray:
    """Image scores of the SKU's torch model (the reference every engine is held to)."""
    model = load_sku(sku)
    with torch.no_grad():
        maps = model.anomaly_maps(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    return image_scores(maps.numpy(), top_k=read_manifest(sku).score.top_k)


def parts(texture: str, n: int, seed: int) -> np.ndarray:
    """n good parts of a texture, N x S x S x 3 uint8."""
    rng = np.random.default_rng(seed)
    return np.stack([render_part(texture, SIZE, rng) for _ in range(n)])


@pytest.mark.slow
def test_teaching_a_new_kind_of_good_part_makes_its_unseen_siblings_normal(quick_sku: Path, tmp_path: Path) -> None:
    sku = copy_sku(quick_sku, tmp_path / "sku")
    grass, brick = parts("grass", 6, seed=7), parts("brick", 6, seed=8)
    before_grass, before_brick = scores(sku, grass), scores(sku, brick)
    assert before_grass.min() > before_brick.max()  # the new kind reads as anomalous: false rejects

    memory_before = read_manifest(sku).model.memory_size
    record = teach_sku(sku, write_good_folder(tmp_path / "grass", 8, SIZE, "grass", seed=3))
    manifest = read_manifest(sku)
    assert manifest.taught == [record]
    assert record.images == 8 and record.memory == (memory_before, manifest.model.memory_size)
    owners = load_sku(sku).segmenter.memory_owner
    per_image_share = -(-memory_before // len(torch.unique(owners[:memory_before])))
    assert 0 < manifest.model.memory_size - memory_before <= 8 * per_image_share

    after_grass, after_brick = scores(sku, grass), scores(sku, brick)
    assert after_grass.max() < before_grass.min()  # grass parts it never saw now score lower than any did
    assert np.all(after_brick <= before_brick + 1e-6)  # a larger memory never raises a distance


def test_taught_patches_are_the_ones_the_memory_covered_least(quick_sku: Path, tmp_path: Path) -> None:
    sku = copy_sku(quick_sku, tmp_path / "sku")
    good = write_good_folder(tmp_path / "brick", 4, SIZE, "brick", seed=5)
    teach_sku(sku, good)
    seg = load_sku(sku).segmenter
    before = read_manifest(quick_sku).model.memory_size
    added = seg.memory[before:]
    kept = seg.memory[:before]
    gaps = torch.cdist(added, kept).min(dim=1).values / seg.memory_scale
    assert torch.all(gaps > COVERED)  # nothing already covered was added
    again = teach_sku(sku, good)  # the same parts a second time add little: their novel patches are covered now
    assert again.memory[1] - again.memory[0] <= added.shape[0] // 4
    # the profile is measured again on the good rows the SKU keeps: a grown memory can only bring them nearer
    center, taught_center = (load_sku(d).segmenter.memory_center for d in (quick_sku, sku))
    assert torch.all(taught_center <= center + 1e-6) and not torch.equal(taught_center, center)


def test_a_sku_without_a_memory_is_refused_in_one_line(exported_random_sku: Path, tmp_path: Path) -> None:
    sku = Path(shutil.copytree(exported_random_sku, tmp_path / "sku"))
    with pytest.raises(DataError, match="no memory of normal patches"):
        teach_sku(sku, write_good_folder(tmp_path / "good", 2, SIZE, "brick"))


@pytest.fixture(scope="module")
def station(quick_sku: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A station folder: its inspector.toml with a version store holding the quick SKU (exported, calibrated on its
    own good folder) as the active version of SKU "brick", and that folder as skus.brick.good_dir."""
    from calibration.thresholds import save_calibration
    from engines.export import export_sku
    from engines.runtime import engine_settings
    from inspector.commands.calibrate import calibrate_sku
    from inspector.skustore import Provenance, SkuStore

    root = tmp_path_factory.mktemp("station")
    sku = copy_sku(quick_sku, root / "trained")
    export_sku(sku)
    calibration_parts = write_good_folder(root / "calibration-good", 12, SIZE, "brick", seed=11)
    save_calibration(calibrate_sku(engine_settings("onnxruntime", threads=1), sku, calibration_parts, 0.1),
                     sku / "calibration.json")
    store = SkuStore(root / "skus")
    store.activate("brick", store.add_version("brick", sku, Provenance(origin="test")))
    (root / "inspector.toml").write_text(
        'active_sku = "brick"\n[engine]\nbackend = "onnxruntime"\nthreads = 1\n[store]\ndir = "skus"\n'
        '[archive]\ndir = "archive"\n[skus.brick]\nmodel_dir = "skus/brick/active"\n'
        f'good_dir = "{calibration_parts.name}"\n')
    return root


def copy_station(station: Path, dest: Path) -> Path:
    """A private copy of the station folder (links kept, so the store's active link stays a link)."""
    return Path(shutil.copytree(station, dest, symlinks=True))


@pytest.mark.slow
def test_sku_update_makes_a_calibrated_version_that_activates_and_rolls_back(
        station: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from inspector.skustore import SkuStore

    root = copy_station(station, tmp_path / "station")
    config = str(root / "inspector.toml")
    store = SkuStore(root / "skus")
    parent = store.active("brick")
    grass = write_good_folder(tmp_path / "grass", 6, SIZE, "grass", seed=3)
    assert main(["sku", "update", "--config", config, "--sku", "brick", "--add-good", str(grass), "--activate"]) == 0
    out = capsys.readouterr().out
    version = store.active("brick")
    assert version != parent and f"version {version} made from {parent}: 6 good parts taught" in out
    folder = store.path("brick", version)
    manifest = read_manifest(folder)
    assert manifest.taught[0].source == str(grass) and manifest.export is not None
    record = next(v for v in store.versions("brick") if v.id == version)
    assert record.origin == "update" and parent in record.source
    # activation ran the daemon's pre-flight: the new calibration was fit on these weights and graphs
    assert main(["sku", "rollback", "--config", config, "--sku", "brick"]) == 0
    assert store.active("brick") == parent


def test_sku_update_without_good_parts_to_calibrate_on_is_one_line(station: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = copy_station(station, tmp_path / "station")
    toml = root / "inspector.toml"
    toml.write_text("\n".join(line for line in toml.read_text().splitlines() if not line.startswith("good_dir")))
    grass = write_good_folder(tmp_path / "grass", 2, SIZE, "grass")
    assert main(["sku", "update", "--config", str(toml), "--sku", "brick", "--add-good", str(grass)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skus.brick.good_dir" in err[0] and "--good DIR" in err[0]
    assert main(["sku", "update", "--config", str(toml), "--sku", "brick", "--from-reviews",
                 "--good", str(grass)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no reviews of SKU 'brick'" in err[0]


def test_sku_update_refuses_to_refit_the_thresholds_on_the_parts_it_taught(station: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from inspector.skustore import SkuStore

    root = copy_station(station, tmp_path / "station")
    store = SkuStore(root / "skus")
    versions = [v.id for v in store.versions("brick")]
    taught = root / "calibration-good"  # skus.brick.good_dir: taught, it would read as normal by construction
    assert main(["sku", "update", "--config", str(root / "inspector.toml"), "--sku", "brick",
                 "--add-good", str(taught)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"12 of the 12 good images under {taught}" in err[0] and "taught" in err[0]
    assert [v.id for v in store.versions("brick")] == versions  # nothing half-made was added


@pytest.mark.slow
def test_sku_update_from_reviews_teaches_the_reviewed_good_parts_cropped_to_the_roi(station: Path,
                                                                                     tmp_path: Path) -> None:
    from inspector.skustore import SkuStore
    from tests.test_review import ROI, reviewed_archive

    root = copy_station(station, tmp_path / "station")
    toml = root / "inspector.toml"
    toml.write_text(toml.read_text() + f"roi = {list(ROI)}\n")
    reviewed_archive(root / "archive")  # 10 good parts (false rejects and confirmed OK) and 6 confirmed defects
    assert main(["sku", "update", "--config", str(toml), "--sku", "brick", "--from-reviews"]) == 0
    store = SkuStore(root / "skus")
    newest = store.versions("brick")[-1]
    taught = read_manifest(newest.path).taught[0]
    assert taught.images == 10 and taught.source.startswith("reviews in ")
    assert store.active("brick") != newest.id  # made, not activated


@pytest.mark.integration
@pytest.mark.slow
@needs_chromium
def test_operator_teaches_reviewed_parts_in_the_browser_then_puts_the_version_live_and_rolls_back(
        station: Path, tmp_path: Path, broker: LocalBroker) -> None:
    """Chromium on the station page: Teach makes a new version from the parts operators reviewed good (in the
    background, while every frame still gets its verdict), Activate puts it live, Roll back returns."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from inspector.config import load_config
    from inspector.service import Daemon
    from inspector.skustore import SkuStore
    from inspector.web.browser import headless_chromium
    from tests.test_review import ROI, reviewed_archive
    from tests.test_web_browser import page_text, version_rows, write_token

    root = copy_station(station, tmp_path / "station")
    reviewed_archive(root / "archive")
    token = write_token(root / "web.token", "teach-test-token-0123456789abcdef")
    toml = root / "inspector.toml"
    toml.write_text(toml.read_text() + f"roi = {list(ROI)}\n" + f"""
[line]
line_id = "it"
station_id = "teach"
[camera]
type = "synthetic"
width = 80
height = 72
fps = 8.0
[mqtt]
port = {broker.port}
spool_dir = "spool"
[service]
watchdog = false
frame_timeout_ms = 60000
[web]
enabled = true
port = 0
token_file = "{token}"
""")
    store = SkuStore(root / "skus")
    parent = store.active("brick")
    daemon = Daemon(load_config(toml))
    daemon.start()
    try:
        assert daemon.web is not None
        with headless_chromium() as driver:
            wait = WebDriverWait(driver, 300.0, poll_frequency=0.2)

            text = functools.partial(page_text, driver)
            rows = functools.partial(version_rows, driver)

            driver.get(daemon.web.url)
            wait.until(lambda _: text("title") == "it / teach")
            driver.find_element(By.ID, "versions-open").click()
            wait.until(lambda _: rows() == [(parent, "running")])
            driver.find_element(By.ID, "versions-token").send_keys(token.read_text().strip())
            inspected = daemon.running.stats.snapshot()["frames"]
            driver.find_element(By.ID, "versions-teach").click()
            wait.until(lambda _: "taught brick: version" in text("versions-teach-state"))
            assert daemon.running.stats.snapshot()["frames"] > inspected  # inspection went on meanwhile
            taught = store.versions("brick")[-1].id
            assert f"version {taught} (10 parts) added" in text("versions-teach-state")
            wait.until(lambda _: rows() == [(parent, "running"), (taught, "")])
            activate = f'#versions-list tr[data-version="{taught}"] .versions-activate'
            driver.find_element(By.CSS_SELECTOR, activate).click()
            wait.until(lambda _: "activate: done (200)" in text("versions-reply"))
            assert daemon.running.sku.version == taught
            driver.find_element(By.ID, "versions-rollback").click()
            wait.until(lambda _: "rollback: done (200)" in text("versions-reply"))
            assert daemon.running.sku.version == parent
            errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
            assert errors == [], errors
    finally:
        daemon.stop()
    stats = daemon.running.stats.snapshot()
    assert stats["frames"] == stats["acquired"]  # every frame one verdict, teaching and changeovers included
