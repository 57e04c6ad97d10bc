"""Training: one step lowers each phase's loss, SKU files round-trip, resume and Ctrl-C replay exactly."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from foundation.errors import ConfigError, DataError
from inspector.commands.train import add_arguments, config_from_args
from tdad.manifest import ModelConfig, TilingRecord, read_manifest
from tdad.model import TDADModel, load_sku, save_sku
from tdad.nets.segmenter import MEMORY_BOOST
from tdad.preprocess import preprocess
from tdad.schedule import Schedule
from tdad.training.sample_data import write_good_folder
from tdad.training.train import (
    LOSSES,
    PHASES,
    PRESETS,
    STATE_DIR,
    Run,
    StepBatches,
    TrainConfig,
    available_cpus,
    configure_threads,
    downsample_mask,
    load_images,
    memory_size_for,
    set_phase,
    train_hash,
    train_sku,
    train_step,
    worker_threads,
)

torch.set_num_threads(1)
S = 64


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_good_folder(tmp_path_factory.mktemp("data") / "good", 6, S, "brick", seed=0)


def tiny_config(data: Path, out: Path, **kw: object) -> TrainConfig:
    knobs = {"image_size": S, "batch_size": 2, "ae_steps": 3, "diffusion_steps": 3, "seg_steps": 2,
             "warmup_steps": 1, "checkpoint_every": 100, "threads": 1, "progress": False, "foreground": "none"}
    return TrainConfig(data=data, out=out, **{**knobs, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("phase", PHASES)
def test_one_step_lowers_the_loss_on_a_fixed_batch(phase: str, good_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(good_dir, tmp_path, batch_size=4)
    model = TDADModel(ModelConfig(image_size=S))
    images = np.stack([np.asarray(torch.randint(0, 256, (S, S, 3), dtype=torch.uint8)) for _ in range(4)])
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in StepBatches(cfg, images, phase, model.schedule)[0].items()}
    params = set_phase(model, phase)
    optimizer = torch.optim.Adam(params, lr=1e-3)
    before = train_step(model, phase, params, optimizer, batch, 1e-3, cfg, amp=False)
    with torch.no_grad():
        after = LOSSES[phase](model, batch, cfg)
    assert after.item() < before.item()


def test_set_phase_freezes_everything_else() -> None:
    model = TDADModel(ModelConfig(image_size=S))
    params = set_phase(model, "diffusion")
    trained = {id(p) for p in [*model.denoiser.parameters(), *model.fusion.parameters()]}
    assert {id(p) for p in params} == trained
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert model.denoiser.training and not model.encoder.training and not model.segmenter.backbone.training


def test_save_and_load_sku_round_trip_bit_exactly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TDADModel(ModelConfig(image_size=S), Schedule(t1=100, t2=300))
    model.set_latent_scale(0.73)
    save_sku(model, tmp_path, train_hash="abc")
    loaded = load_sku(tmp_path)
    assert loaded.schedule == model.schedule and loaded.config == model.config
    assert loaded.latent_scale == pytest.approx(0.73)
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    meta = read_manifest(tmp_path)
    assert meta.train_hash == "abc" and meta.latent_channels == 4 and meta.image_size == S
    assert meta.score.top_k > 0 and meta.code_version


def test_load_sku_names_the_missing_or_corrupt_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"meta\.json"):
        load_sku(tmp_path)
    save_sku(TDADModel(ModelConfig(image_size=S)), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataError, match=r"model\.safetensors"):
        load_sku(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(DataError, match=r"meta\.json"):
        load_sku(tmp_path)


def test_image_size_must_divide_by_32() -> None:
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=48)


def _weights(sku_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sku_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(good_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sku(tiny_config(good_dir, tmp_path_factory.mktemp("straight")))


@pytest.mark.slow
def test_train_writes_a_loadable_sku(straight_run: Path) -> None:
    meta = read_manifest(straight_run)
    assert meta.train is not None and set(meta.train.losses) == set(PHASES) and len(meta.train_hash) == 64
    assert meta.latent_scale > 0 and meta.model.memory_size == 0 and meta.model.memory_boost == 0.0
    assert meta.model.residual  # new SKUs compare x with x + decode(z_rec) - decode(z0)
    model = load_sku(straight_run)
    with torch.inference_mode():
        maps = model.anomaly_maps(torch.rand(1, 3, S, S))
    assert maps.shape == (1, S, S)


@pytest.mark.slow
def test_resume_replays_an_uninterrupted_run(good_dir: Path, straight_run: Path, tmp_path: Path) -> None:
    cfg = tiny_config(good_dir, tmp_path, stop_after=4)  # stops after the first diffusion step
    train_sku(cfg)
    assert not (tmp_path / "model.safetensors").exists()
    train_sku(dataclasses.replace(cfg, stop_after=None), resume=True)
    expected, got = _weights(straight_run), _weights(tmp_path)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    resumed, straight = read_manifest(tmp_path).train, read_manifest(straight_run).train
    assert resumed is not None and straight is not None and resumed.losses == straight.losses


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_finishes_identically(good_dir: Path, straight_run: Path,
                                                             tmp_path: Path) -> None:
    cfg = tiny_config(good_dir, tmp_path, checkpoint_every=1)
    state = tmp_path / STATE_DIR / "state.json"

    def interrupt_once_training() -> None:
        while not state.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_training, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        train_sku(cfg)
    assert state.exists() and not (tmp_path / "model.safetensors").exists()
    train_sku(cfg, resume=True)
    expected, got = _weights(straight_run), _weights(tmp_path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_without_checkpoint_is_an_operator_error(good_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"state\.json"):
        train_sku(tiny_config(good_dir, tmp_path), resume=True)


def test_a_checkpoint_from_before_memory_profiles_resumes_and_other_gaps_are_refused(tmp_path: Path) -> None:
    """A run checkpointed before memories had profiles resumes (--resume is how a finished run stores its memories
    and chooses its settings: the profile is filled there, neutral until then); a checkpoint missing any other
    tensor is a corrupt one."""
    cfg = TrainConfig(data=tmp_path, out=tmp_path, image_size=S)
    config = ModelConfig(image_size=S, memory_size=64)
    Run(cfg, TDADModel(config)).save()
    resumed = Run(cfg, TDADModel(dataclasses.replace(config, memory_profile=True)))
    resumed.load()
    assert torch.equal(resumed.model.segmenter.memory_center, torch.ones(1, 1, S // 8, S // 8))
    with pytest.raises(DataError, match=r"corrupt checkpoint.*missing"):
        Run(cfg, TDADModel(dataclasses.replace(config, fine_memory_size=8))).load()


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.config = None
    return args


def test_cli_preset_and_overrides(tmp_path: Path) -> None:
    cfg, resume = config_from_args(_parse("--out", str(tmp_path), "--data", "d", "--preset", "tiny",
                                          "--seg-steps", "7", "--device", "cpu"))
    assert not resume and cfg.image_size == PRESETS["tiny"]["image_size"] and cfg.seg_steps == 7
    with pytest.raises(ConfigError, match="image_size"):
        config_from_args(_parse("--out", str(tmp_path), "--data", "d", "--image-size", "100"))
    with pytest.raises(DataError, match="--data"):
        config_from_args(_parse("--out", str(tmp_path)))
    base = ("--out", str(tmp_path), "--data", "d", "--device", "cpu")
    cfg, _ = config_from_args(_parse(*base))  # the small preset searches 16384 entries, stores 65536
    assert (cfg.memory, cfg.inference_memory) == (16384, 65536) and memory_size_for(cfg, 10**4, inference=True) == 65536
    cfg, _ = config_from_args(_parse(*base, "--memory", "4096"))  # --memory alone: searched and stored, as before
    assert memory_size_for(cfg, 10**4, inference=True) == 4096 == memory_size_for(cfg, 10**4)
    cfg, _ = config_from_args(_parse(*base, "--memory", "4096", "--inference-memory", "8192"))
    assert (memory_size_for(cfg, 10**4), memory_size_for(cfg, 10**4, inference=True)) == (4096, 8192)
    assert memory_size_for(cfg, 3) == 3 * (cfg.image_size // 8) ** 2  # capped at the training patches
    with pytest.raises(ConfigError, match="--inference-memory 100 is below --memory 16384"):
        config_from_args(_parse(*base, "--inference-memory", "100"))
    assert config_from_args(_parse(*base))[0].memory_boost == MEMORY_BOOST
    boosted, _ = config_from_args(_parse(*base, "--memory-boost", "8"))
    assert boosted.memory_boost == 8.0  # inference-only: the weights' hash is the default's (hand-set, as it)
    assert train_hash(boosted, "data") == train_hash(config_from_args(_parse(*base, "--no-select"))[0], "data")
    with pytest.raises(ConfigError, match=r"memory_boost=-1\.0: use a finite value >= 0"):
        config_from_args(_parse(*base, "--memory-boost", "-1"))
    with pytest.raises(ConfigError, match="--memory-boost 8: this run has no memory prior"):
        config_from_args(_parse(*base, "--memory", "0", "--memory-boost", "8"))
    fine, _ = config_from_args(_parse(*base, "--fine-memory", "16384", "--fine-boost", "1.5"))
    assert (fine.fine_memory, fine.fine_boost) == (16384, 1.5)  # inference-only as well
    assert train_hash(fine, "data") == train_hash(config_from_args(_parse(*base, "--no-select"))[0], "data")
    with pytest.raises(ConfigError, match=r"--fine-boost 1\.5: this run has no fine memory"):
        config_from_args(_parse(*base, "--fine-boost", "1.5"))
    with pytest.raises(ConfigError, match="fine_memory=-1: use 0"):
        config_from_args(_parse(*base, "--fine-memory", "-1"))


def test_cli_reconstruction_and_resize_reach_the_config(tmp_path: Path) -> None:
    base = ("--out", str(tmp_path), "--data", "d", "--device", "cpu")
    cfg, _ = config_from_args(_parse(*base))
    assert (cfg.reconstruction, cfg.resize) == ("two_stage", "stretch")
    cfg, _ = config_from_args(_parse(*base, "--no-reconstruction", "--resize", "letterbox"))
    assert (cfg.reconstruction, cfg.resize) == ("none", "letterbox")
    assert config_from_args(_parse(*base, "--reconstruction", "stage1"))[0].reconstruction == "stage1"
    assert cfg.residual and not config_from_args(_parse(*base, "--decoded-reconstruction"))[0].residual
    assert cfg.amp and not config_from_args(_parse(*base, "--no-amp"))[0].amp
    assert config_from_args(_parse(*base, "--seg-width", "3"))[0].seg_width == 3.0
    assert cfg.steps("autoencoder") == cfg.steps("diffusion") == 0 and cfg.steps("segmenter") == cfg.seg_steps
    with pytest.raises(ConfigError, match="resize='square'"):
        tiny_config(Path("d"), tmp_path, resize="square")


def test_cli_tile_scale_and_overlap_reach_the_config_and_bad_ones_name_the_flag(tmp_path: Path) -> None:
    base = ("--out", str(tmp_path), "--data", "d", "--device", "cpu")
    cfg, _ = config_from_args(_parse(*base, "--tile-scale", "0.25", "--tile-overlap", "0.125"))
    assert cfg.tiling() == TilingRecord(scale=0.25, overlap=0.125)
    assert config_from_args(_parse(*base))[0].tiling() is None  # whole images, as before
    with pytest.raises(ConfigError, match="--tile-overlap needs --tile-scale"):
        config_from_args(_parse(*base, "--tile-overlap", "0.1"))
    with pytest.raises(ConfigError, match="resize='letterbox' does not apply to a tiled SKU"):
        config_from_args(_parse(*base, "--tile-scale", "0.5", "--resize", "letterbox"))
    for bad, match in ((("--tile-scale", "0"), "tile_scale=0.0"), (("--tile-scale", "1", "--tile-overlap", "0.5"),
                                                                     "tile_overlap=0.5")):
        with pytest.raises(ConfigError, match=match):
            config_from_args(_parse(*base, *bad))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "native resolution" in " ".join(parser.format_help().split())


def test_a_tiled_sku_trains_on_random_crops_of_images_scaled_once_and_remembers_every_tile(tmp_path: Path) -> None:
    data = write_good_folder(tmp_path / "big", 3, 160, "brick", seed=1)  # 160 px parts at scale 0.5: 80 px
    cfg = tiny_config(data, tmp_path / "sku", tile_scale=0.5, tile_overlap=0.25, memory=10_000)
    images, _ = load_images(cfg)
    assert [im.shape for im in images] == [(80, 80, 3)] * 3
    batches = StepBatches(cfg, images, "segmenter", Schedule())
    first = batches[0]
    assert first["clean"].shape == (cfg.batch_size, 3, S, S) and first["mask"].shape == (cfg.batch_size, 1, S, S)
    assert np.array_equal(batches[0]["clean"], first["clean"])  # crops are a function of (seed, phase, step)
    assert not np.array_equal(batches[1]["clean"], first["clean"])
    sku = train_sku(cfg)
    meta = read_manifest(sku)
    assert meta.tiling == TilingRecord(scale=0.5, overlap=0.25) and meta.image_size == S
    # the memory samples the 2 x 2 tiles inspection cuts from each 80 px image, every patch of them here, each
    # tagged with its source image (what a training crop of that image may not match)
    assert meta.model.memory_size == 3 * 4 * (S // 8) ** 2
    assert torch.bincount(_weights(sku)["segmenter.memory_owner"]).tolist() == [4 * (S // 8) ** 2] * 3


def test_cli_texture_source_reaches_the_config_and_old_checkpoints_keep_theirs(tmp_path: Path) -> None:
    base = ("--out", str(tmp_path), "--data", "d", "--device", "cpu")
    cfg, _ = config_from_args(_parse(*base))
    assert (cfg.textures, cfg.texture_dir) == ("builtin", None)
    assert config_from_args(_parse(*base, "--textures", "self"))[0].textures == "self"
    assert config_from_args(_parse(*base, "--texture-dir", "dtd"))[0].texture_dir == Path("dtd")
    with pytest.raises(ConfigError, match="drop one"):
        config_from_args(_parse(*base, "--textures", "self", "--texture-dir", "dtd"))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    before_the_bank = {k: v for k, v in cfg.to_dict().items() if k != "textures"}
    assert TrainConfig.from_dict(before_the_bank).textures == "self"  # a resumed run replays what it started with


@pytest.mark.slow
def test_no_reconstruction_trains_the_segmenter_alone_and_cannot_be_exported(good_dir: Path, tmp_path: Path) -> None:
    from engines.export import export_sku

    sku = train_sku(tiny_config(good_dir, tmp_path, reconstruction="none", resize="crop", memory=32,
                                inference_memory=96, memory_boost=5.0))
    meta = read_manifest(sku)
    assert meta.reconstruction == "none" and meta.preprocess.resize == "crop"
    assert meta.model.memory_size == 96 and meta.model.memory_boost == 5.0  # the SKU infers at its boost
    # training searched 32 entries (the last checkpoint); the SKU stores a fresh 96-entry sample, every image's
    trained = load_file(str(sku / STATE_DIR / "weights.safetensors"))
    stored = _weights(sku)
    assert trained["model.segmenter.memory"].shape[0] == 32 and stored["segmenter.memory"].shape[0] == 96
    assert set(stored["segmenter.memory_owner"].tolist()) == set(range(6))
    assert not torch.equal(trained["model.segmenter.memory_scale"], stored["segmenter.memory_scale"])
    assert meta.train is not None and set(meta.train.losses) == {"segmenter"}
    model = load_sku(sku)
    x = torch.from_numpy(preprocess(load_images(tiny_config(good_dir, tmp_path))[0][:1]))  # a good part: unsaturated
    with torch.inference_mode():
        assert torch.equal(model.anomaly_maps(x), model.segmenter(x, x))
    with pytest.raises(DataError, match="ablation SKU"):
        export_sku(sku)
    # the boost is inference-only: --resume --memory-boost on the finished run rewrites the SKU, weights unchanged
    cfg, resume = config_from_args(_parse("--out", str(sku), "--resume", "--memory-boost", "7", "--device", "cpu",
                                           "--threads", "1"))
    assert resume and cfg.memory_boost == 7.0
    train_sku(cfg, resume=True)
    assert read_manifest(sku).model.memory_boost == 7.0 and read_manifest(sku).train_hash == meta.train_hash
    assert [k for k, v in _weights(sku).items() if not torch.equal(stored[k], v)] == []
    # so is the fine memory: --resume --fine-memory adds it to the finished run's SKU, the trained tensors kept
    cfg, _ = config_from_args(_parse("--out", str(sku), "--resume", "--fine-memory", "64", "--fine-boost", "1.5",
                                     "--device", "cpu", "--threads", "1"))
    train_sku(cfg, resume=True)
    fine = read_manifest(sku)
    assert (fine.model.fine_memory_size, fine.model.fine_boost, fine.train_hash) == (64, 1.5, meta.train_hash)
    weights = _weights(sku)
    assert weights["segmenter.fine_memory"].shape == (64, 120)
    assert [k for k, v in stored.items() if not torch.equal(weights[k], v)] == []
    with torch.inference_mode():
        assert not torch.equal(load_sku(sku).segmenter(x, x), model.segmenter(x, x))
    train_sku(config_from_args(_parse("--out", str(sku), "--resume", "--fine-memory", "0", "--device", "cpu",
                                      "--threads", "1"))[0], resume=True)  # and --fine-memory 0 takes it out
    assert read_manifest(sku).model.fine_memory_size == 0 and _weights(sku).keys() == stored.keys()


def test_threads_never_exceed_the_cpus_left_by_the_workers(tmp_path: Path) -> None:
    import cv2

    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        assert configure_threads(tiny_config(Path("d"), tmp_path, threads=1)) == 1
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
        auto = configure_threads(tiny_config(Path("d"), tmp_path, threads=0, num_workers=1))
        assert auto == max(1, available_cpus() - 1) == torch.get_num_threads() == cv2.getNumThreads()
        worker_threads(0)
        assert torch.get_num_threads() == 1 and cv2.getNumThreads() == 1
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def test_width_scales_every_network_and_round_trips(tmp_path: Path) -> None:
    wide = ModelConfig(image_size=S).widened(2.0)
    assert wide.denoiser_channels == tuple(2 * c for c in ModelConfig().denoiser_channels)
    assert wide.seg_channels == tuple(2 * c for c in ModelConfig().seg_channels)
    assert ModelConfig(image_size=S).widened(0.1).ae_channels == (8, 8, 8)  # never below one GroupNorm group
    model = TDADModel(wide)
    narrow = sum(p.numel() for p in TDADModel(ModelConfig(image_size=S)).parameters())
    assert sum(p.numel() for p in model.parameters()) > 2 * narrow
    assert load_sku(save_sku(model, tmp_path)).config == wide  # the manifest carries the widths
    with pytest.raises(ConfigError, match="width=0"):
        ModelConfig(image_size=S).widened(0)
    seg_only = ModelConfig(image_size=S).widened(1.0, seg_width=2.0)  # the segmenter decoder alone
    assert seg_only.seg_channels == wide.seg_channels
    assert dataclasses.replace(seg_only, seg_channels=ModelConfig().seg_channels) == ModelConfig(image_size=S)
    with pytest.raises(ConfigError, match="seg_width=-1"):
        ModelConfig(image_size=S).widened(1.0, seg_width=-1)


@pytest.mark.parametrize("phase", PHASES)
def test_every_phase_trains_under_bf16_autocast_as_on_cuda(phase: str, good_dir: Path, tmp_path: Path) -> None:
    """CUDA training runs each loss under bf16 autocast; CPU autocast is the same dtype machinery, so a mixed-dtype
    op (bf16 latents lerped with a float weight) or a memory distance left in bf16 is caught without a GPU."""
    torch.manual_seed(0)
    cfg = tiny_config(good_dir, tmp_path, batch_size=2)
    model = TDADModel(ModelConfig(image_size=S, memory_size=64))
    model.segmenter.memory.normal_()
    images = np.stack([np.asarray(torch.randint(0, 256, (S, S, 3), dtype=torch.uint8)) for _ in range(2)])
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in StepBatches(cfg, images, phase, model.schedule)[0].items()}
    params = set_phase(model, phase)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[phase](model, batch, cfg)
        if phase == "segmenter":
            queries = torch.randn(1, model.segmenter.memory.shape[1], 4, 4)
            distance = model.segmenter.memory_distance(queries)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in params if p.requires_grad)
    if phase == "segmenter":
        assert distance.dtype == torch.float32
        torch.testing.assert_close(distance, model.segmenter.memory_distance(queries))


def test_masks_downsample_to_block_means_as_area_interpolation_did() -> None:
    """The segmenter's targets at strides 8, 4, 2: bit-identical on the CPU to the interpolate(mode="area") they
    replace (CUDA pooled the batches' stride-0 masks to zeros with it), so CPU training is unchanged."""
    masks = (np.random.default_rng(0).random((3, 64, 64)) > 0.8).astype(np.float32)[:, None]  # stride 0, as batched
    mask = torch.from_numpy(masks)
    assert mask.stride()[1] == 0
    for size in (8, 16, 32, 64):
        blocks = masks.reshape(3, 1, size, 64 // size, size, 64 // size).mean(axis=(3, 5))
        np.testing.assert_allclose(downsample_mask(mask, size).numpy(), blocks, rtol=1e-6)
        assert torch.equal(downsample_mask(mask, size), torch.nn.functional.interpolate(mask, size=size, mode="area"))
