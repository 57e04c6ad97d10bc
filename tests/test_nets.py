"""Shapes, ranges and frozen-ness of the TDAD networks at a small image size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from tdad.manifest import ModelConfig
from tdad.model import TDADModel
from tdad.nets.autoencoder import Decoder, Encoder
from tdad.nets.backbone import Backbone
from tdad.nets.denoiser import Denoiser, timestep_embedding
from tdad.nets.fusion import Fusion
from tdad.nets.segmenter import Segmenter, patch_features
from tdad.training.train import fill_memory

torch.set_num_threads(1)
S = 64


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    torch.manual_seed(0)
    return Segmenter(S, (8, 16, 16, 16)).eval()


def test_autoencoder_shapes_and_range() -> None:
    enc, dec = Encoder((8, 16, 16), 4), Decoder((8, 16, 16), 4)
    x = torch.rand(2, 3, S, S)
    z = enc(x)
    assert z.shape == (2, 4, S // 8, S // 8)
    rec = dec(z).detach()
    assert rec.shape == x.shape and float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0


def test_latent_scale_buffer_scales_encoder_and_is_undone_by_decoder() -> None:
    enc, dec = Encoder((8, 16, 16), 4), Decoder((8, 16, 16), 4)
    x = torch.rand(1, 3, S, S)
    z1, r1 = enc(x), dec(enc(x))
    enc.latent_scale.fill_(2.0)
    dec.latent_scale.fill_(2.0)
    torch.testing.assert_close(enc(x), 2.0 * z1)
    torch.testing.assert_close(dec(enc(x)), r1)


def test_denoiser_shape_and_zero_init_output() -> None:
    den = Denoiser(4, 8, (16, 32, 32), 64)
    z, cond = torch.randn(3, 4, 8, 8), torch.randn(3, 8, 8, 8)
    eps = den(z, torch.tensor([0, 120, 999]), cond).detach()
    assert eps.shape == z.shape
    assert float(eps.abs().max()) == 0.0  # zero-initialised output conv: training starts from eps = 0
    assert timestep_embedding(torch.tensor([1, 2]), 64).shape == (2, 64)


def test_fusion_shape() -> None:
    assert Fusion(4, 8, 16)(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)).shape == (2, 8, 8, 8)


def test_backbone_features_frozen_and_always_eval() -> None:
    bb = Backbone(S)
    bb.train()
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    feats = bb(torch.rand(1, 3, S, S))
    assert [f.shape[1:] for f in feats] == [(16, 32, 32), (24, 16, 16), (40, 8, 8), (80, 4, 4)]


def test_segmenter_multiscale_logits_and_map(segmenter: Segmenter) -> None:
    x, rec = torch.rand(2, 3, S, S), torch.rand(2, 3, S, S)
    logits = segmenter.logits(x, rec)
    assert [tuple(lg.shape) for lg in logits] == [(2, 1, s, s) for s in (8, 16, 32, 64)]
    maps = segmenter(x, rec).detach()
    assert maps.shape == (2, S, S) and float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def test_memory_prior_distances_exclude_the_source_image_and_read_about_one() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    model = TDADModel(dataclasses.replace(ModelConfig(image_size=S), memory_size=4 * 8 * 8)).eval()  # every patch
    scale = fill_memory(model, images, torch.device("cpu"), batch=2, seed=0)
    seg = model.segmenter
    assert scale > 0 and sorted(set(seg.memory_owner.tolist())) == [0, 1, 2, 3]
    x = torch.from_numpy(images[:2].transpose(0, 3, 1, 2) / 255.0).float()
    queries = patch_features(seg.backbone(x))
    assert float(seg.memory_distance(queries).max()) < 1e-2  # each patch finds itself
    apart = seg.memory_distance(queries, exclude=torch.tensor([0, 1]))
    assert 0.3 < float(apart.mean()) < 3.0  # leave-one-image-out distances are what the scale normalises
    assert seg.fuse[2][0].in_channels == 3 * 40 + 1
    own = seg.logits(x, x)
    assert tuple(own[0].shape) == (2, 1, 8, 8)
    with torch.no_grad():  # the prior alone: gain * (distance - 1) on every scale's logits
        seg.memory_gain.fill_(0.0)
        without = seg.logits(x, x, exclude=torch.tensor([0, 1]))
        seg.memory_gain.fill_(2.0)
        prior = [a - b for a, b in zip(seg.logits(x, x, exclude=torch.tensor([0, 1])), without, strict=True)]
    assert torch.allclose(prior[0], 2.0 * (apart - 1.0), atol=1e-4)
    assert all(p.shape[-1] == s for p, s in zip(prior, (8, 16, 32, 64), strict=True))
    with torch.no_grad():  # inference (forward, so every exported graph) adds memory_boost to the learnt gain
        seg.memory_boost = 1.5
        boosted = torch.logit(seg(x, x).double()).float()
        unboosted = seg.logits(x, x)[-1][:, 0]
    here = F.interpolate(seg.memory_distance(queries), size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(boosted - unboosted, 1.5 * (here - 1.0), atol=1e-3)


def test_a_memory_profile_standardises_each_cell_against_good_images_matched_without_their_own_patches() -> None:
    """With memory_profile, fill_memory draws the same memory (and scale), keeps good rows and adds each cell's
    mean and spread of their leave-one-image-out distances; inference's memory term is then (distance - centre) /
    spread, the training logits untouched. A profile trained on images whose top rows differ a lot from image to
    image centres those cells higher, so only an excess over what good parts show there counts."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = np.full((6, S, S, 3), 128, np.uint8) + rng.integers(0, 8, (6, S, S, 3), dtype=np.uint8)
    images[:, :16] = rng.integers(0, 256, (6, 16, S, 3), dtype=np.uint8)  # the top two cell rows: all unlike
    config = dataclasses.replace(ModelConfig(image_size=S), memory_size=6 * 8 * 8 // 2)
    plain = TDADModel(config).eval()
    model = TDADModel(dataclasses.replace(config, memory_profile=True)).eval()
    assert model.load_state_dict(plain.state_dict(), strict=False).missing_keys == [
        "segmenter.memory_center", "segmenter.memory_spread", "segmenter.profile_rows",
        "segmenter.profile_owner"]  # the same networks, plus a neutral profile with no rows
    cpu = torch.device("cpu")
    assert fill_memory(model, images, cpu, 2, 0) == fill_memory(plain, images, cpu, 2, 0)
    seg = model.segmenter
    assert torch.equal(seg.memory, plain.segmenter.memory)  # the profile's rows are drawn after the sample
    x = torch.from_numpy(images.transpose(0, 3, 1, 2) / 255.0).float()
    with torch.no_grad():
        apart = seg.memory_distance(patch_features(seg.backbone(x)), exclude=torch.arange(6))
    mean = F.avg_pool2d(apart.mean(0, keepdim=True), 3, 1, 1, count_include_pad=False)
    torch.testing.assert_close(seg.memory_center, mean)  # every image is a profile row here (6 < PROFILE_ROWS)
    assert seg.profile_owner[:6].tolist() == list(range(6)) and seg.profile_owner[6:].eq(-1).all()
    assert torch.equal(seg.profile_rows[:6], torch.from_numpy(images))  # kept, to be measured again when taught
    assert float(seg.memory_center[..., :2, :].min()) > float(seg.memory_center[..., 4:, :].max())
    assert float(seg.memory_spread.min()) >= 0.5 * float(seg.memory_spread.median()) - 1e-6
    with torch.no_grad():
        seg.memory_boost = 1.5
        boosted = torch.logit(seg(x[:2], x[:2]).double()).float()
        learnt = seg.logits(x[:2], x[:2])[-1][:, 0]
        torch.testing.assert_close(learnt, plain.segmenter.logits(x[:2], x[:2])[-1][:, 0])
        term = (seg.memory_distance(patch_features(seg.backbone(x[:2]))) - seg.memory_center) / seg.memory_spread
    here = F.interpolate(term, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(boosted - learnt, 1.5 * here, atol=1e-3)


def test_a_memory_of_one_source_image_keeps_a_neutral_profile() -> None:
    """Tiles of a single good image have no other image to be matched against: the profile stays centre 1, spread 1
    (the memory term distance - 1) instead of a mean over no distances."""
    images = np.random.default_rng(4).integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    config = dataclasses.replace(ModelConfig(image_size=S), memory_size=64, memory_profile=True)
    model = TDADModel(config).eval()
    fill_memory(model, images, torch.device("cpu"), 2, 0, owners=np.zeros(4, np.int64))
    assert torch.equal(model.segmenter.memory_center, torch.ones(1, 1, S // 8, S // 8))
    assert torch.equal(model.segmenter.memory_spread, torch.ones(1, 1, S // 8, S // 8))


def test_the_fine_memory_adds_its_distance_at_inference_only(tmp_path: Path) -> None:
    """store_fine_memory keeps descriptors of the 2x-upsampled images (4 px cells), scaled so a good cell of
    another image reads ~1; forward adds fine_boost * (distance - 1) to the map's logits, and the logits
    training's loss sees are untouched."""
    from tdad.training.train import TrainConfig, store_fine_memory

    torch.manual_seed(0)
    images = np.random.default_rng(2).integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    model = TDADModel(ModelConfig(image_size=S)).eval()
    x = torch.from_numpy(images[:2].transpose(0, 3, 1, 2) / 255.0).float()
    with torch.no_grad():
        before = model.segmenter.logits(x, x)[-1][:, 0]
    cfg = TrainConfig(data=tmp_path, out=tmp_path, image_size=S, fine_memory=10**6, fine_boost=1.5)
    store_fine_memory(model, images, None, cfg, torch.device("cpu"))
    seg = model.segmenter
    cells = (S // 4) ** 2
    assert seg.fine_memory.shape == (4 * cells, 120) and model.config.fine_memory_size == 4 * cells  # capped
    assert model.config.fine_boost == seg.fine_boost == 1.5 and float(seg.fine_memory_scale) > 0
    with torch.no_grad():
        distance = seg.fine_distance(x)
        assert tuple(distance.shape) == (2, 1, S // 4, S // 4) and float(distance.max()) < 1e-2  # finds itself
        assert torch.equal(seg.logits(x, x)[-1][:, 0], before)
        boosted = torch.logit(seg(x, x).double()).float()
    here = F.interpolate(distance, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(boosted - before, 1.5 * (here - 1.0), atol=1e-3)
    with pytest.raises(ValueError, match="at least one entry"):
        seg.resize_fine_memory(0)


def test_a_resized_memory_is_refilled_with_its_own_scale() -> None:
    """What a trained SKU stores for inference: more entries than training searched, normalised afresh."""
    torch.manual_seed(0)
    images = np.random.default_rng(1).integers(0, 256, (4, S, S, 3), dtype=np.uint8)
    model = TDADModel(dataclasses.replace(ModelConfig(image_size=S), memory_size=16)).eval()
    small = fill_memory(model, images, torch.device("cpu"), batch=2, seed=0)
    model.segmenter.resize_memory(4 * 8 * 8)
    seg = model.segmenter
    assert seg.memory.shape == (256, 120) and seg.memory_size == 256 and int(seg.memory_owner.max()) == -1
    large = fill_memory(model, images, torch.device("cpu"), batch=2, seed=0)
    assert 0 < large < small  # more entries: nearer neighbours, so a smaller scale keeps a normal patch at ~1
    assert sorted(set(seg.memory_owner.tolist())) == [0, 1, 2, 3]
    assert seg(torch.rand(1, 3, S, S), torch.rand(1, 3, S, S)).shape == (1, S, S)
    with pytest.raises(ValueError, match="needs a memory"):
        TDADModel(ModelConfig(image_size=S)).segmenter.resize_memory(8)


def test_eager_memory_search_in_blocks_finds_what_one_matmul_does(monkeypatch: pytest.MonkeyPatch) -> None:
    import tdad.nets.segmenter as segmenter

    gen = torch.Generator().manual_seed(0)
    queries, memory = torch.randn(2, 12, 4, 4, generator=gen), torch.randn(1000, 12, generator=gen)
    skip = torch.rand(2, 1, 1000, generator=gen) < 0.3
    scale = torch.tensor(2.0)
    reference = torch.cdist(queries.permute(0, 2, 3, 1).reshape(2, 16, 12), memory)
    reference = reference.masked_fill(skip, float("inf")).amin(-1).reshape(2, 1, 4, 4) / scale
    monkeypatch.setattr(segmenter, "SEARCH_BLOCK", 32 * 300)  # 32 queries: blocks of 300 entries, the last short
    torch.testing.assert_close(segmenter.nearest_distance(queries, memory, scale, skip), reference)
