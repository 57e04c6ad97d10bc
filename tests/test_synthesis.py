"""Anomaly synthesis: exact masks, foreground restriction, determinism, Perlin noise, texture sources and the
built-in offline texture bank."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from foundation.errors import ConfigError, DataError
from tdad.noise import fractal_perlin, perlin_noise
from tdad.training.data import FolderDataset
from tdad.training.sample_data import render_part
from tdad.training.synthesis import AnomalySynthesizer, otsu_foreground, perlin_mask, region_mask, shuffled_patches
from tdad.training.textures import BUILTIN_KINDS, BUNDLED_PHOTOS, BuiltinTextures, TextureBank, bundled_photos
from tests.fixtures_data import make_good_folder

SIZE = 64


def _parts(n: int, size: int = SIZE, texture: str = "brick") -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [render_part(texture, size, rng) for _ in range(n)]


def _part_on_background(size: int, bright_object: bool) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc on a flat background; returns (image, disc mask)."""
    disc = np.zeros((size, size), np.uint8)
    cv2.circle(disc, (size // 2, size // 2), size // 4, 1, -1)
    part = render_part("gravel", size, np.random.default_rng(3)) // 2 + (127 if bright_object else 0)
    image = np.where(disc[..., None] > 0, part, 20 if bright_object else 235).astype(np.uint8)
    return image, disc.astype(bool)


def test_perlin_noise_shape_range_and_lattice_zeros() -> None:
    noise = perlin_noise((50, 70), (4, 8), np.random.default_rng(0))
    assert noise.shape == (50, 70) and noise.dtype == np.float32
    assert -1.0 <= noise.min() < noise.max() <= 1.0 and noise.std() > 0.05
    cell_y, cell_x = 13, 9  # ceil(50 / 4), ceil(70 / 8): gradient noise vanishes on lattice points
    assert np.allclose(noise[::cell_y, ::cell_x], 0.0, atol=1e-6)
    assert np.array_equal(noise, perlin_noise((50, 70), (4, 8), np.random.default_rng(0)))


def test_fractal_perlin_and_masks_have_image_shape() -> None:
    rng = np.random.default_rng(1)
    assert fractal_perlin(48, rng).shape == (48, 48)
    for make in (perlin_mask, region_mask):
        masks = [make(48, rng) for _ in range(20)]
        assert all(m.shape == (48, 48) and m.dtype == bool for m in masks)
        assert any(m.any() for m in masks) and not all(m.all() for m in masks)


@pytest.mark.parametrize("foreground", ["none", "otsu"])
def test_mask_is_exactly_where_pixels_may_differ(foreground: str) -> None:
    synth = AnomalySynthesizer(SIZE, foreground=foreground, anomaly_prob=0.7)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    applied = 0
    for image in _parts(40):
        out, mask = synth(image, rng)
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert mask.dtype == np.float32 and mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0.0, 1.0}
        outside = mask == 0
        assert np.array_equal(out[outside], image[outside])
        if mask.any():
            applied += 1
            assert mask.sum() >= synth.min_area or foreground == "otsu"
        else:
            assert np.array_equal(out, image)
    assert 15 <= applied <= 38


def test_no_anomaly_gives_empty_mask_and_untouched_copy() -> None:
    image = _parts(1)[0]
    out, mask = AnomalySynthesizer(SIZE, anomaly_prob=0.0)(image, np.random.default_rng(0))
    assert not mask.any() and np.array_equal(out, image) and out is not image


def test_anomaly_prob_one_always_draws_a_visible_anomaly() -> None:
    synth = AnomalySynthesizer(SIZE, anomaly_prob=1.0, beta_range=(1.0, 1.0), foreground="none")
    rng = np.random.default_rng(2)
    for image in _parts(20):
        out, mask = synth(image, rng)
        assert mask.sum() >= synth.min_area
        assert (out != image).any()


@pytest.mark.parametrize("bright_object", [True, False])
def test_otsu_restricts_anomalies_to_the_object(bright_object: bool) -> None:
    image, disc = _part_on_background(SIZE, bright_object)
    fg = otsu_foreground(image)
    assert (fg & disc).sum() / disc.sum() > 0.95 and (fg & ~disc).sum() < 0.02 * fg.size
    synth = AnomalySynthesizer(SIZE, anomaly_prob=1.0, foreground="otsu")
    rng = np.random.default_rng(4)
    for _ in range(30):
        out, mask = synth(image, rng)
        assert mask.any() and not (mask.astype(bool) & ~fg).any()
        assert np.array_equal(out[~fg], image[~fg])


def test_otsu_on_a_full_frame_texture_uses_the_whole_frame() -> None:
    synth = AnomalySynthesizer(SIZE, foreground="otsu")
    assert all(synth.foreground_mask(image) is None for image in _parts(5))


def test_fixed_foreground_array_is_resized_and_respected() -> None:
    region = np.zeros((16, 16), bool)
    region[4:12, 2:6] = True
    synth = AnomalySynthesizer(SIZE, anomaly_prob=1.0, foreground=region)
    allowed = cv2.resize(region.astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST) > 0
    rng = np.random.default_rng(5)
    for image in _parts(20):
        _, mask = synth(image, rng)
        assert mask.any() and not (mask.astype(bool) & ~allowed).any()
    with pytest.raises(ConfigError, match="empty"):
        AnomalySynthesizer(SIZE, foreground=np.zeros((8, 8), bool))


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="foreground must be"):
        AnomalySynthesizer(SIZE, foreground="auto")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="anomaly_prob"):
        AnomalySynthesizer(SIZE, anomaly_prob=1.5)
    with pytest.raises(ConfigError, match="needs texture_dir"):
        AnomalySynthesizer(SIZE, source_weights={"texture": 1.0}, textures="self")
    with pytest.raises(ConfigError, match="textures='dtd'"):
        AnomalySynthesizer(SIZE, textures="dtd")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="drop one"):
        AnomalySynthesizer(SIZE, texture_dir=Path("textures"), textures="self")


def test_deterministic_for_a_seed() -> None:
    images = _parts(6)

    def run(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        synth = AnomalySynthesizer(SIZE, anomaly_prob=1.0)
        rng = np.random.default_rng(seed)
        return [synth(image, rng) for image in images]

    first, again, other = run(11), run(11), run(12)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))
    seeded = AnomalySynthesizer(SIZE, anomaly_prob=1.0, seed=3)
    assert np.array_equal(seeded(images[0])[1], AnomalySynthesizer(SIZE, anomaly_prob=1.0, seed=3)(images[0])[1])


def test_texture_folder_is_the_source_when_given(tmp_path: Path) -> None:
    halves = np.zeros((SIZE, SIZE, 3), np.uint8)
    halves[:, : SIZE // 2] = (0, 200, 255)
    (tmp_path / "nested").mkdir()
    cv2.imwrite(str(tmp_path / "halves.png"), halves)
    cv2.imwrite(str(tmp_path / "nested" / "flat.png"), np.full((SIZE, SIZE, 3), 90, np.uint8))
    synth = AnomalySynthesizer(
        SIZE,
        texture_dir=tmp_path,
        anomaly_prob=1.0,
        foreground="none",
        beta_range=(1.0, 1.0),
        source_weights={"texture": 1.0},
    )
    assert synth.textures is not None and len(synth.textures) == 2
    rng = np.random.default_rng(6)
    for image in _parts(10):
        out, mask = synth(image, rng)
        painted = out[mask.astype(bool)]
        assert all(len(np.unique(painted[:, c])) <= 2 for c in range(3))


def test_without_texture_dir_the_builtin_bank_is_the_default_and_self_opts_out() -> None:
    synth = AnomalySynthesizer(SIZE)
    assert isinstance(synth.textures, BuiltinTextures) and set(synth.sources) == {"texture", "self", "plain"}
    old = AnomalySynthesizer(SIZE, textures="self")
    assert old.textures is None and set(old.sources) == {"self", "plain"}


def test_builtin_textures_are_the_same_in_every_bank_and_read_only() -> None:
    first, again, other = BuiltinTextures(SIZE), BuiltinTextures(SIZE), BuiltinTextures(SIZE, seed=1)
    for i in range(2 * len(BUILTIN_KINDS)):
        assert np.array_equal(first.get(i), again.get(i)) and first.get(i) is first.get(i)
        assert not first.get(i).flags.writeable
    assert any(not np.array_equal(first.get(i), other.get(i)) for i in range(len(BUILTIN_KINDS)))
    assert np.array_equal(first.sample(np.random.default_rng(4)), again.sample(np.random.default_rng(4)))


@pytest.mark.parametrize("size", [8, 33, SIZE, 128])
def test_builtin_textures_are_varied_uint8_images_of_every_kind(size: int) -> None:
    bank = BuiltinTextures(size, n=3 * len(BUILTIN_KINDS))
    textures = [bank.get(i) for i in range(len(bank))]
    assert {bank.kind(i) for i in range(len(bank))} == set(BUILTIN_KINDS)
    assert all(t.shape == (size, size, 3) and t.dtype == np.uint8 for t in textures)
    flat = np.stack([t.reshape(-1).astype(np.float32) for t in textures])
    distances = np.abs(flat[:, None] - flat[None]).mean(axis=2)[np.triu_indices(len(textures), 1)]
    assert distances.min() > 1.0  # no two textures of the bank alike
    means = flat.reshape(len(textures), -1, 3).mean(axis=1)
    assert means.min() < 96 and means.max() > 160 and (means.std(axis=0) > 20).all()  # dark, bright, all hues
    if size >= SIZE:
        assert sum(float(t.std()) > 5.0 for t in textures) >= 0.8 * len(textures)  # textured, not flat colour


def test_bundled_photos_come_from_the_installed_scikit_image() -> None:
    photos = bundled_photos()
    assert len(photos) == len(BUNDLED_PHOTOS)  # every file ships in the wheel, so none is ever fetched
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 64 for p in photos)


def test_builtin_bank_fills_anomalies_with_foreign_texture() -> None:
    synth = AnomalySynthesizer(SIZE, anomaly_prob=1.0, foreground="none", beta_range=(1.0, 1.0),
                               source_weights={"texture": 1.0})
    rng = np.random.default_rng(9)
    changed = []
    for image in _parts(12):
        out, mask = synth(image, rng)
        inside = mask.astype(bool)
        assert np.array_equal(out[~inside], image[~inside])
        changed.append(float(np.abs(out[inside].astype(np.int16) - image[inside]).mean()))
    assert np.median(changed) > 20.0


def test_texture_bank_errors_and_skips_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no texture images"):
        TextureBank(tmp_path, SIZE)
    (tmp_path / "bad.png").write_text("not an image")
    cv2.imwrite(str(tmp_path / "good.png"), _parts(1, 32)[0])
    bank = TextureBank(tmp_path, SIZE)
    assert bank.get(0).shape == (SIZE, SIZE, 3)
    assert bank.get(0) is bank.get(1)


def test_shuffled_patches_is_a_pixel_permutation() -> None:
    image = _parts(1)[0]
    shuffled = shuffled_patches(image, np.random.default_rng(8))
    assert shuffled.shape == image.shape and not np.array_equal(shuffled, image)
    assert np.array_equal(np.sort(shuffled.reshape(-1, 3), axis=0), np.sort(image.reshape(-1, 3), axis=0))


def test_wrong_image_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected a uint8"):
        AnomalySynthesizer(SIZE)(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0))


def test_synthesizer_and_datasets_pickle_for_dataloader_workers(tmp_path: Path) -> None:
    make_good_folder(tmp_path / "good", n=2, size=SIZE)
    synth = AnomalySynthesizer(SIZE, texture_dir=tmp_path / "good", anomaly_prob=1.0)
    dataset = FolderDataset(tmp_path / "good", SIZE)
    synth_copy, dataset_copy = pickle.loads(pickle.dumps((synth, dataset)))
    image = dataset_copy[0].image
    assert np.array_equal(synth(image, np.random.default_rng(1))[0], synth_copy(image, np.random.default_rng(1))[0])


@pytest.mark.parametrize("size", [8, 33, 50, 97])
def test_odd_image_sizes_work(size: int) -> None:
    synth = AnomalySynthesizer(size, anomaly_prob=1.0, region_prob=0.5)
    rng = np.random.default_rng(size)
    for image in _parts(10, size):
        out, mask = synth(image, rng)
        assert out.shape == image.shape and mask.shape == (size, size) and mask.any()
        assert np.array_equal(out[mask == 0], image[mask == 0])
