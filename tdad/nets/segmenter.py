"""Segmenter: anomaly map from an image and its two-stage reconstruction (frozen features + U-Net head)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from tdad.nets.backbone import Backbone

PRIOR = 0.05  # initial anomaly probability of every pixel
MEMORY_GAIN = 2.0  # initial logit per unit of normalised memory distance above a normal patch's
# logit per unit of memory distance that inference adds to the learnt gain: synthetic anomalies teach the decoder
# to lean on reconstruction evidence, real defects need the prior more (measured on both real sets: docs/accuracy.md)
MEMORY_BOOST = 2.0
# logit per unit of fine-memory distance (a SKU's optional second memory on a 2x-finer grid; README: measured)
FINE_BOOST = 1.0
# good rows a memory profile is measured on, kept with it so that it is measured again whenever the memory changes
# (teaching); 64 measured as well as 300 on a validation slice
PROFILE_ROWS = 64


def _conv_act(in_ch: int, out_ch: int, k: int = 3) -> nn.Sequential:
    """Conv + BatchNorm + ReLU (BN folds into the conv at export)."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, k, padding=k // 2, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU())


def patch_features(feats: list[torch.Tensor]) -> torch.Tensor:
    """Backbone taps -> N x (40 + 80) x S/8 x S/8 locally averaged patch descriptors (stride 8, plus stride 16
    upsampled): what the normal-patch memory stores and is searched with, as in PatchCore."""
    f8 = F.avg_pool2d(feats[2], 3, stride=1, padding=1, count_include_pad=False)
    f16 = F.avg_pool2d(feats[3], 3, stride=1, padding=1, count_include_pad=False)
    f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([f8, f16], dim=1)


class Segmenter(nn.Module):
    """Per-scale fusion of [f(x), f(x_rec), |f(x) - f(x_rec)|] at strides 2..16, a U-Net decoder with
    skips back to full resolution, plus |x - x_rec| at full resolution; logits at strides 8, 4, 2, 1.

    With memory_size > 0 the stride-8 fusion also gets each patch's distance to the nearest of memory_size
    patch descriptors of the SKU's good images (a normal-appearance prior that synthetic anomalies alone
    cannot teach: which real variation, like a tile's streaks, is normal). forward (inference, every exported
    graph) weights that prior by memory_boost more than training does; training's loss calls logits unboosted.

    With memory_profile each memory's inference term is the distance standardised per map position against good
    images (centre and spread at each cell, measured by training on up to PROFILE_ROWS good rows it keeps here,
    each matched without its own image's entries), in place of distance - 1: a part's edges and fixtures read far
    from every memory entry on good parts too, and only a cell's excess over what good parts show there is
    evidence.
    """

    def __init__(self, image_size: int, channels: tuple[int, int, int, int], memory_size: int = 0,
                 memory_boost: float = 0.0, fine_memory_size: int = 0, fine_boost: float = 0.0,
                 memory_profile: bool = False) -> None:
        super().__init__()
        self.backbone = Backbone(image_size)
        feat = self.backbone.channels
        self.image_size = image_size
        self.memory_profile = memory_profile
        self.memory_size = memory_size
        self.memory_boost = float(memory_boost)
        self.fine_memory_size = 0
        self.fine_boost = float(fine_boost)
        if fine_memory_size:
            self.resize_fine_memory(fine_memory_size)
        extra = (0, 0, 1, 0) if memory_size else (0, 0, 0, 0)  # the memory distance joins the stride-8 fusion
        self.fuse = nn.ModuleList(_conv_act(3 * f + e, c, 1) for f, c, e in zip(feat, channels, extra, strict=True))
        if memory_size:  # filled by training (fill_memory); zeros until then
            self.register_buffer("memory", torch.zeros(memory_size, feat[2] + feat[3]))
            self.register_buffer("memory_owner", torch.full((memory_size,), -1, dtype=torch.int64))
            self.register_buffer("memory_scale", torch.ones(()))
            if memory_profile:  # ones: distance - 1, until training measures them (fill_memory); no rows yet
                self.register_buffer("memory_center", torch.ones(1, 1, image_size // 8, image_size // 8))
                self.register_buffer("memory_spread", torch.ones(1, 1, image_size // 8, image_size // 8))
                self.register_buffer("profile_rows", torch.zeros(PROFILE_ROWS, image_size, image_size, 3,
                                                                 dtype=torch.uint8))
                self.register_buffer("profile_owner", torch.full((PROFILE_ROWS,), -1, dtype=torch.int64))
            # every scale's logit starts from gain * (distance - 1): a patch unlike any good one is suspect from
            # the first step, and the decoder learns where reconstruction evidence overrules the prior
            self.memory_gain = nn.Parameter(torch.tensor(MEMORY_GAIN))
        c2, c4, c8, c16 = channels
        self.bottom = _conv_act(c16, c16)
        self.dec8 = _conv_act(c16 + c8, c8)
        self.dec4 = _conv_act(c8 + c4, c4)
        self.dec2 = _conv_act(c4 + c2, c2)
        self.dec1 = _conv_act(c2 + 3, c2)
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in (c8, c4, c2, c2))
        for head in self.heads:  # start from "almost surely normal" (p = 0.05), the focal-loss prior trick
            nn.init.constant_(head.bias, -math.log((1.0 - PRIOR) / PRIOR))

    def logits(self, x: torch.Tensor, x_rec: torch.Tensor, exclude: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x, x_rec: N x 3 x S x S in [0, 1] -> training's logits N x 1 x s x s at s = S/8, S/4, S/2, S, each with
        the learnt gain * (distance - 1) (exclude: N memory owner ids whose entries x may not match, its own
        source image)."""
        logits, distance = self._decode(x, x_rec, exclude)
        if distance is None:
            return logits
        return [lg + self.memory_gain * (_upsample(distance, lg.shape[-2:]) - 1.0) for lg in logits]

    def _decode(self, x: torch.Tensor, x_rec: torch.Tensor,
                exclude: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The decoder's logits at strides 8, 4, 2, 1 before any memory term, and the stride-8 memory distance
        (N x 1 x S/8 x S/8; None without a memory)."""
        n = x.shape[0]
        feats = self.backbone(torch.cat([x, x_rec], dim=0))
        extra: list[list[torch.Tensor]] = [[], [], [], []]
        distance = None
        if self.memory_size:
            distance = self.memory_distance(patch_features([a[:n] for a in feats]), exclude)
            extra[2] = [distance]
        fused = [f(torch.cat([a[:n], a[n:], (a[:n] - a[n:]).abs(), *e], dim=1))
                 for f, a, e in zip(self.fuse, feats, extra, strict=True)]
        f2, f4, f8, f16 = fused
        h = self.bottom(f16)
        outs = []
        for dec, skip in ((self.dec8, f8), (self.dec4, f4), (self.dec2, f2), (self.dec1, (x - x_rec).abs())):
            h = dec(torch.cat([F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False), skip], 1))
            outs.append(h)
        return [head(h) for head, h in zip(self.heads, outs, strict=True)], distance

    def map_terms(self, x: torch.Tensor, x_rec: torch.Tensor,
                  memory_only: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three evidence terms of the final logit, each N x S x S: the learnt logit (decoder + learnt gain *
        (distance - 1)), the memory term and the fine-memory term (zeros without one; Segmenter.standardised), so
        that forward's map is sigmoid(learnt + memory_boost * memory + fine_boost * fine) and setting selection can
        weigh them anew without another pass. memory_only (a quick SKU, learnt evidence zeroed): the learnt term
        is zeros and neither x_rec nor the decoder is computed."""
        size = x.shape[-2:]
        if memory_only:
            final = x.new_zeros((x.shape[0], 1, *size))
            distance = self.memory_distance(self.memory_features(x))
        else:
            logits, distance = self._decode(x, x_rec, None)
            final = logits[-1]
        memory = torch.zeros_like(final)
        if distance is not None:
            near = _upsample(distance, size) - 1.0  # upsampled once: the learnt gain's term and, without a profile,
            if not memory_only:                     # the memory term (every full SKU's exported graph runs this)
                final = final + self.memory_gain * near
            memory = _upsample(self.standardised(distance, "memory"), size) if self.memory_profile else near
        fine = torch.zeros_like(final)
        if self.fine_memory_size:
            fine = _upsample(self.standardised(self.fine_distance(x), "fine"), size)
        return final[:, 0], memory[:, 0], fine[:, 0]

    def standardised(self, distance: torch.Tensor, which: str) -> torch.Tensor:
        """A memory's N x 1 x h x w distance as its inference term: (distance - centre) / spread per cell with a
        memory profile (which: "memory" or "fine"), else distance - 1 (a good patch reads ~1 on average)."""
        if not self.memory_profile:
            return distance - 1.0
        return (distance - getattr(self, f"{which}_center")) / getattr(self, f"{which}_spread")

    def memory_map(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x S x S in [0, 1] -> N x S x S maps of the memory terms alone, sigmoid(memory_boost * memory +
        fine_boost * fine): a quick SKU's map (ModelConfig.memory_only), what forward gives once the
        learnt evidence is zeroed, without the reconstruction, the second backbone pass or the decoder."""
        _, memory, fine = self.map_terms(x, x, memory_only=True)
        return torch.sigmoid(self.memory_boost * memory + self.fine_boost * fine)

    def resize_memory(self, size: int) -> None:
        """Give a memory segmenter `size` empty entries (to be refilled by fill_memory): a trained SKU stores a
        larger sample for inference than its training searched, since search cost is per step there."""
        if not self.memory_size or size < 1:
            raise ValueError(f"resize_memory({size}): the segmenter needs a memory and at least one entry")
        self.memory = self.memory.new_zeros(size, self.memory.shape[1])
        self.memory_owner = self.memory_owner.new_full((size,), -1)
        self.memory_size = size

    def resize_fine_memory(self, size: int) -> None:
        """Give the segmenter `size` empty fine-memory entries (filled by tdad.training.train.store_fine_memory)."""
        if size < 1:
            raise ValueError(f"resize_fine_memory({size}): the fine memory needs at least one entry")
        width = self.backbone.channels[2] + self.backbone.channels[3]
        device = next(self.backbone.parameters()).device  # where the segmenter already is, as resize_memory does
        self.register_buffer("fine_memory", torch.zeros(size, width, device=device))
        self.register_buffer("fine_memory_scale", torch.ones((), device=device))
        if self.memory_profile:  # the fine profile's rows are the memory's; its entries' sources are kept for it
            cells = self.image_size // 4
            self.register_buffer("fine_center", torch.ones(1, 1, cells, cells, device=device))
            self.register_buffer("fine_spread", torch.ones(1, 1, cells, cells, device=device))
            self.register_buffer("fine_memory_owner", torch.full((size,), -1, dtype=torch.int64, device=device))
        self.fine_memory_size = size

    def drop_fine_memory(self) -> None:
        """Remove the fine memory (setting selection found it does not pay for its search)."""
        if self.fine_memory_size:
            del self.fine_memory, self.fine_memory_scale
            if self.memory_profile:
                del self.fine_center, self.fine_spread, self.fine_memory_owner
        self.fine_memory_size, self.fine_boost = 0, 0.0

    def memory_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x S x S -> N x D x S/8 x S/8 patch descriptors: what the memory stores and is searched with."""
        return patch_features(self.backbone(x))

    def fine_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x S x S -> N x D x S/4 x S/4 patch descriptors of x upsampled 2x: the memory's descriptors on
        a grid twice as fine, so a defect a few pixels wide moves the distance of the cells it is in."""
        return self.memory_features(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))

    def memory_distance(self, queries: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """N x D x h x w patch features -> N x 1 x h x w distance to the nearest memory entry / memory_scale
        (entries owned by `exclude` are skipped)."""
        skip = None if exclude is None else self.memory_owner[None, None, :] == exclude[:, None, None]
        return nearest_distance(queries, self.memory, self.memory_scale, skip)

    def fine_distance(self, x: torch.Tensor) -> torch.Tensor:
        """x: N x 3 x S x S -> N x 1 x S/4 x S/4 distance of fine_features to the nearest fine-memory entry /
        fine_memory_scale (a good cell reads ~1)."""
        return nearest_distance(self.fine_features(x), self.fine_memory, self.fine_memory_scale)

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """x, x_rec: N x 3 x S x S in [0, 1] -> anomaly maps N x S x S in [0, 1]: the map_terms weighed by
        memory_boost and fine_boost (inference only: training's loss never sees either)."""
        learnt, memory, fine = self.map_terms(x, x_rec)
        return torch.sigmoid(learnt + self.memory_boost * memory + self.fine_boost * fine)


def _upsample(cells: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """N x 1 x h x w -> N x 1 x size, bilinear (how every memory term reaches the map's pixels)."""
    return F.interpolate(cells, size=size, mode="bilinear", align_corners=False)


SEARCH_BLOCK = 1 << 22  # distance-matrix elements per block in eager search (16 MB of float32)


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor, scale: torch.Tensor,
                     skip: torch.Tensor | None = None) -> torch.Tensor:
    """N x D x h x w patch features -> N x 1 x h x w distance to the nearest row of memory / scale (matmul form,
    which exports to every backend; skip: N x 1 x M, True where an entry may not match).

    Eager calls (training, setting selection) search the memory in blocks of entries with a running minimum,
    each block one fused |m|^2 - 2 q.m (baddbmm, the skipped entries' |m|^2 set to inf) and its minimum, |q|^2
    added after it: the same distances to float rounding, 1.8x faster than the plain form, and each block's
    temporaries stay small enough for the allocator to reuse, where one N*h*w x M matrix (512 MB for 8 frames
    against 65536 entries) is mapped and zero-filled afresh by the kernel on every call. A traced or exported
    graph searches the whole memory in one Gemm."""
    n, d, h, w = queries.shape
    # float32 even under autocast: |q|^2 - 2 q.m + |m|^2 cancels, and bf16/fp16 would leave noise for distance
    with torch.autocast(queries.device.type, enabled=False):
        q = queries.float().permute(0, 2, 3, 1).reshape(n, h * w, d)
        q2 = (q * q).sum(-1, keepdim=True)
        m2 = (memory * memory).sum(-1)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # one Gemm, |m|^2 - 2 q.m: a single N*h*w x M buffer where q2 - 2 q @ m.t() + m2 held three or four
            d2 = torch.addmm(m2, q.reshape(n * h * w, d), memory.t(), alpha=-2.0).reshape(n, h * w, -1)
            if skip is not None:
                d2 = d2.masked_fill(skip, float("inf"))
            nearest = d2.amin(-1) + q2[..., 0]
        else:
            m2n = m2.expand(n, -1) if skip is None else m2.masked_fill(skip[:, 0], float("inf"))
            block = max(256, SEARCH_BLOCK // max(1, n * h * w))
            nearest = None
            for start in range(0, memory.shape[0], block):
                rows = memory[start : start + block].t().expand(n, -1, -1)
                part = torch.baddbmm(m2n[:, None, start : start + block], q, rows, alpha=-2.0).amin(-1)
                nearest = part if nearest is None else torch.minimum(nearest, part)
            assert nearest is not None
            nearest = nearest + q2[..., 0]
        return (nearest.clamp_min(0.0).sqrt() / scale).reshape(n, 1, h, w)
