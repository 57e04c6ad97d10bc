"""The typed SKU manifest: round trip, upgrade of schema-1, -2 and -3 files, the tiling record, the export
record's derived-graph records, refusal of newer or malformed ones, the score's top-k as a share of the map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foundation.errors import DataError
from tdad.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    DerivedGraphsRecord,
    ModelConfig,
    TilingRecord,
    maps_fingerprint,
    new_manifest,
    read_manifest,
    score_top_k,
    with_derived,
    write_manifest,
)
from tdad.schedule import Schedule
from tdad.scoring import DEFAULT_TOP_K, top_k_for

# meta.json as training wrote it before the schema was versioned (schema 1)
SCHEMA_1 = {
    "image_size": 64, "latent_channels": 4, "latent_scale": 0.8,
    "schedule": Schedule(t1=100).to_dict(), "model": ModelConfig(image_size=64).to_dict(),
    "code_version": "0.1.0", "train_hash": "h", "created": "2024-01-01T00:00:00+00:00",
    "train": {"losses": {"autoencoder": 0.1}, "config": {"seed": 0}},
}


def test_a_written_manifest_reads_back_equal(tmp_path: Path) -> None:
    manifest = new_manifest(ModelConfig(image_size=64), Schedule(steps1=2), 0.5, train_hash="abc")
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    raw = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and raw["image_size"] == 64 and raw["latent_channels"] == 4


def test_a_schema_1_file_is_upgraded_on_read(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(SCHEMA_1))
    manifest = read_manifest(tmp_path)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.schedule == Schedule(t1=100)
    assert manifest.image_size == 64 and manifest.score.top_k == score_top_k(tmp_path) > 0
    assert manifest.train is not None and manifest.train.losses == {"autoencoder": 0.1}


def test_derived_graph_records_are_typed_and_kept_through_upgrade_and_rewrite(tmp_path: Path) -> None:
    int8 = {"files": ["encoder.int8.onnx"], "calibration": "4 images of /good", "method": "QDQ minmax",
            "ops": ["Conv"], "tool": "onnxruntime==1.22.0"}
    export = {"opset": 17, "weights_sha256": "w", "files": ["encoder.onnx"], "int8": int8}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(SCHEMA_1 | {"export": export}))
    manifest = read_manifest(tmp_path)
    assert manifest.export is not None and manifest.export.int8 == DerivedGraphsRecord(**int8)
    assert manifest.export.fp16 is None
    fp16 = DerivedGraphsRecord(files=["encoder.fp16.onnx"], tool="onnxconverter-common==1.14.0")
    write_manifest(tmp_path, with_derived(manifest, "fp16", fp16))
    again = read_manifest(tmp_path).export
    assert again is not None and again.fp16 == fp16 and again.int8 == manifest.export.int8 and again.opset == 17
    with pytest.raises(ValueError, match="no export record"):
        with_derived(new_manifest(ModelConfig(image_size=64), Schedule(), 0.5), "int8", fp16)


@pytest.mark.parametrize(("change", "message"), [
    ({"schema_version": SCHEMA_VERSION + 1}, "newer than this inspector reads"),
    ({"score": {"top_k": 0}}, "score.top_k"),
    ({"model": ModelConfig(image_size=64).to_dict() | {"image_size": 48}}, "image_size=48"),
    ({"schedule": {"t1": 5000}}, "t1=5000"),
])
def test_newer_or_malformed_files_name_the_file_and_the_key(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(SCHEMA_1 | change))
    with pytest.raises(DataError, match=rf"meta\.json.*{message}"):
        read_manifest(tmp_path)


def test_a_new_skus_top_k_is_a_share_of_its_map_and_older_skus_keep_theirs(tmp_path: Path) -> None:
    assert [top_k_for(s) for s in (64, 128, 256, 512)] == [6, 25, DEFAULT_TOP_K, 400]
    for size in (64, 256):
        assert new_manifest(ModelConfig(image_size=size), Schedule(), 1.0).score.top_k == top_k_for(size)
    schema_2 = SCHEMA_1 | {"schema_version": 2, "score": {"top_k": 100}}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(schema_2))
    manifest = read_manifest(tmp_path)  # a 64 px SKU trained with the fixed 100 px keeps scoring with 100 px
    assert manifest.score.top_k == 100 and manifest.image_size == 64
    assert manifest.preprocess.resize == "stretch" and manifest.reconstruction == "two_stage"
    assert manifest.tiling is None and manifest.schema_version == SCHEMA_VERSION == 7
    assert manifest.model.memory_boost == 0.0  # what SKUs before the boost computed
    assert not manifest.model.residual  # nor the residual reconstruction
    assert manifest.model.fine_memory_size == 0 and manifest.model.fine_boost == 0.0  # nor a fine memory


@pytest.mark.parametrize(("change", "message"), [
    ({"preprocess": {"resize": "squash"}}, "preprocess.resize"),
    ({"reconstruction": "stage3"}, "reconstruction"),
])
def test_unknown_resize_or_reconstruction_modes_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(SCHEMA_1 | {"schema_version": 3} | change))
    with pytest.raises(DataError, match=rf"meta\.json.*{message}"):
        read_manifest(tmp_path)


def test_a_schema_3_file_reads_as_untiled_and_a_tiling_record_round_trips(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(SCHEMA_1 | {"schema_version": 3}))
    assert read_manifest(tmp_path).tiling is None  # SKUs trained before tiling inspect the whole frame
    tiled = new_manifest(ModelConfig(image_size=64), Schedule(), 1.0, tiling=TilingRecord(scale=0.25, overlap=0.125))
    write_manifest(tmp_path, tiled)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["tiling"] == {"scale": 0.25, "overlap": 0.125}
    assert read_manifest(tmp_path).tiling == TilingRecord(scale=0.25, overlap=0.125)


@pytest.mark.parametrize(("tiling", "message"), [
    ({"scale": 0}, "tiling.scale"),
    ({"scale": 1.0, "overlap": 0.5}, "tiling.overlap"),
    ({"scale": 1.0, "stride": 3}, "tiling.stride"),
])
def test_bad_tiling_records_are_refused_naming_the_key(tmp_path: Path, tiling: dict, message: str) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(SCHEMA_1 | {"schema_version": 4, "tiling": tiling}))
    with pytest.raises(DataError, match=rf"meta\.json.*{message}"):
        read_manifest(tmp_path)


def test_a_calibration_fit_by_an_earlier_build_keeps_its_sku_fingerprint(tmp_path: Path) -> None:
    """The fingerprint 5d44279 computed for this SKU: fields added to the manifest since (memory_only, trained_on)
    must not change it, or every station's calibration is refused after an upgrade."""
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    model = ModelConfig(image_size=64, memory_size=16, memory_boost=1.0, fine_memory_size=8, fine_boost=0.5)
    write_manifest(tmp_path, new_manifest(model, Schedule(), 0.5, trained_on=["0123456789abcdef"]))
    assert maps_fingerprint(tmp_path) == "a7a699785c7b39b2c210cd62ecab65acbd9d5ed8c8c80c7c6868d71c2274b93c"

