"""The typed SKU manifest: round trip, upgrade of schema-1 files, refusal of newer or malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engines.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    ModelConfig,
    new_manifest,
    read_manifest,
    score_top_k,
    write_manifest,
)
from engines.schedule import Schedule
from foundation.errors import DataError

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
