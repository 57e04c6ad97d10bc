"""`inspector train`: train a SKU's TDAD model from good images (a preset plus flags, or resume a checkpoint)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from engines.manifest import RECONSTRUCTIONS, ModelConfig
from engines.nets.segmenter import FINE_BOOST, MEMORY_BOOST
from engines.preprocess import RESIZE_MODES
from engines.synthesis import TEXTURE_MIXES
from engines.train import PRESETS, TrainConfig, read_checkpoint_config, train_sku
from foundation.errors import ConfigError, DataError
from inspector.commands.common import device_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector train`."""
    import torch

    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sku", help="SKU name from inspector.toml; trains into its model_dir")
    where.add_argument("--out", type=Path, help="SKU directory to write")
    parser.add_argument("--data", type=Path, help="training data root (required unless --resume)")
    parser.add_argument("--dataset", choices=("folder", "mvtec", "visa"), default="folder")
    parser.add_argument("--category", help="mvtec/visa category, e.g. bottle")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="small",
                        help="image size, width, batch and steps per phase (tiny: a few CPU minutes at 64 px; "
                             "small: the CPU default, 128 px; full: 256 px; gpu: 256 px at twice the width, "
                             "for a CUDA box)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--width", type=float,
                        help="network widths times this (1 = the CPU default; 2 = twice the channels, about four "
                             "times the compute), stored in the SKU")
    parser.add_argument("--seg-width", type=float,
                        help="the segmenter decoder's widths times this instead of --width (default: --width): "
                             "segmenter capacity without the autoencoder's and denoiser's compute (2 on the small "
                             "preset: README, 'Tried and not adopted')")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--memory", type=int,
                        help="normal patch descriptors the segmenter compares each patch with (0 = none; capped at "
                             "the training set's patches), the prior that tells real normal variation from defects")
    parser.add_argument("--inference-memory", type=int,
                        help="entries the SKU stores and inference searches, at least --memory (small preset: "
                             "65536, capped at the training set's patches; --memory alone stores --memory): a larger "
                             "sample drawn after training, whose per-step search stays --memory-sized; costs "
                             "inference time (README)")
    parser.add_argument("--memory-boost", type=float,
                        help=f"how far inference trusts the memory prior over reconstruction evidence: logit per "
                             f"unit of memory distance added to the learnt gain (default {MEMORY_BOOST:g}); "
                             f"inference-only (same weights at every value): measure values on labelled parts with "
                             f"inspector eval --memory-boost, then --resume --memory-boost B on the finished run "
                             f"rewrites its SKU in a minute (re-export after; README)")
    parser.add_argument("--fine-memory", type=int, metavar="N",
                        help="also store N normal descriptors on a grid twice as fine (4 px cells at the model size) "
                             "and add their distance to the map at inference (default 0 = none): finer defect "
                             "outlines for thin defects, at a search cost per frame; inference-only like "
                             "--memory-boost, so --resume --fine-memory N on the finished run adds it (README)")
    parser.add_argument("--fine-boost", type=float,
                        help=f"logit per unit of fine-memory distance (default {FINE_BOOST:g}); needs --fine-memory")
    parser.add_argument("--ae-steps", type=int)
    parser.add_argument("--diffusion-steps", type=int)
    parser.add_argument("--seg-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU)")
    parser.add_argument("--textures", choices=TEXTURE_MIXES, default="builtin",
                        help="what synthetic anomalies are filled with, besides the image's own shuffled patches and "
                             "plain colour: builtin (default) = an offline bank of procedural textures and "
                             "scikit-image's bundled photos, nothing downloaded; self = own patches and plain colour "
                             "only (the behaviour before the built-in bank); recorded in the SKU's meta.json")
    parser.add_argument("--texture-dir", type=Path,
                        help="folder of anomaly source textures (e.g. DTD), used instead of the built-in bank")
    parser.add_argument("--foreground", choices=("otsu", "none"), default="otsu")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="stretch",
                        help="how non-square images become the square model input, stored in the SKU so eval, "
                             "calibrate and the daemon do the same: stretch (default, aspect not kept), letterbox "
                             "(longer side fits, black bars) or crop (shorter side fits, centre cut)")
    parser.add_argument("--tile-scale", type=float, metavar="F",
                        help="inspect in tiles at this scale instead of squashing the whole image into one model "
                             "input: model px per camera px after the ROI crop. 1.0 = inspect at the camera's native "
                             "resolution; 0.25 = a 2448x2048 frame becomes 612x512 and 5x4 tiles of 128. Smaller "
                             "defects need a larger scale, more tiles cost more time per frame. Training learns on "
                             "random tile-size crops of images scaled the same way; stored in the SKU")
    parser.add_argument("--tile-overlap", type=float, default=0.0, metavar="F",
                        help="with --tile-scale: share of a tile its neighbours overlap at least, in [0, 0.5) "
                             "(default 0; e.g. 0.125 so a defect on a tile border is seen whole by one tile)")
    recon = parser.add_mutually_exclusive_group()
    recon.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default="two_stage",
                       help="what the segmenter compares the input with (default two_stage, the product); others "
                            "are ablation SKUs (torch backend only) that skip the phases they do not need")
    recon.add_argument("--no-reconstruction", dest="reconstruction", action="store_const", const="none",
                       help="same as --reconstruction none: train only the segmenter, fed the input as its own "
                            "reconstruction (the ablation baseline of inspector eval --ablation --compare-sku)")
    parser.add_argument("--decoded-reconstruction", dest="residual", action="store_false",
                        help="feed the segmenter decode(z_rec) itself, as before the residual reconstruction (an "
                             "ablation): by default it gets x + decode(z_rec) - decode(z0), the diffusion's edit on "
                             "the sharp input, so the autoencoder's blur does not read as a defect")
    parser.add_argument("--no-amp", dest="amp", action="store_false",
                        help="train in float32 on CUDA instead of under bf16 autocast (no effect on the CPU)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="batch-synthesis worker processes, one torch and one OpenCV thread each")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op and OpenCV threads of the training process (0 = the CPUs this process "
                             "may use minus --num-workers), so threads + workers never exceed the cores; with "
                             "another job on the box, give each its share")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in <out>/train_state")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """Build the TrainConfig (from a preset + flags, or from the checkpoint when resuming)."""
    out = args.out
    if args.sku:
        from inspector.config import load_config, resolve_sku

        out = resolve_sku(load_config(args.config), args.sku).model_dir
    if args.resume:
        cfg = read_checkpoint_config(out)
        runtime = {"out": out, "device": args.device, "num_workers": args.num_workers, "threads": args.threads}
        for name in ("memory_boost", "fine_memory", "fine_boost"):  # inference-only: a finished run rewrites its
            if getattr(args, name) is not None:                       # SKU with the new value in seconds
                runtime[name] = getattr(args, name)
        return boost_applies(dataclasses.replace(cfg, **runtime), args), True
    if args.data is None:
        raise DataError("inspector train: --data DIR is required (the folder of good images or the data set root)")
    if args.tile_overlap and args.tile_scale is None:
        raise ConfigError("--tile-overlap needs --tile-scale (the overlap of the tiles a tiled SKU is inspected in)")
    knobs = dict(PRESETS[args.preset])
    memory = args.memory if args.memory is not None else knobs.get("memory", 0)
    if args.memory is not None and args.inference_memory is None:
        knobs["inference_memory"] = 0  # --memory alone sets the memory searched and stored, as before the split
    if args.inference_memory is not None and args.inference_memory < memory:
        raise ConfigError(f"--inference-memory {args.inference_memory} is below --memory {memory}: inference "
                          "searches at least what training did; raise it or drop it")
    for name in ("image_size", "width", "seg_width", "batch_size", "memory", "inference_memory", "memory_boost",
                 "fine_memory", "fine_boost", "ae_steps", "diffusion_steps", "seg_steps", "lr"):
        if getattr(args, name) is not None:
            knobs[name] = getattr(args, name)
    cfg = TrainConfig(data=args.data, out=out, dataset=args.dataset, category=args.category, seed=args.seed,
                      device=args.device, texture_dir=args.texture_dir, textures=args.textures,
                      foreground=args.foreground,
                      num_workers=args.num_workers, threads=args.threads, checkpoint_every=args.checkpoint_every,
                      resize=args.resize, reconstruction=args.reconstruction, residual=args.residual, amp=args.amp,
                      tile_scale=args.tile_scale,
                      tile_overlap=args.tile_overlap, **knobs)
    ModelConfig(image_size=cfg.image_size).widened(cfg.width, cfg.seg_width)  # validates size and widths first
    return boost_applies(cfg, args), False


def boost_applies(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """cfg, or ConfigError when --memory-boost is given to a run without a memory prior, or --fine-boost to one
    without a fine memory (either would do nothing)."""
    if args.memory_boost is not None and not cfg.memory:
        raise ConfigError(f"--memory-boost {args.memory_boost:g}: this run has no memory prior (--memory 0), so no "
                          "boost applies; drop --memory-boost or give it --memory N")
    if args.fine_boost is not None and not cfg.fine_memory:
        raise ConfigError(f"--fine-boost {args.fine_boost:g}: this run has no fine memory, so no boost applies; "
                          "drop --fine-boost or give it --fine-memory N")
    return cfg


def run(args: argparse.Namespace) -> int:
    """`inspector train`: exit 0 when the SKU directory is written, 130 when interrupted (checkpointed)."""
    cfg, resume = config_from_args(args)
    try:
        train_sku(cfg, resume=resume)
    except KeyboardInterrupt:
        return 130
    return 0
