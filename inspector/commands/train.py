"""`inspector train`: train a SKU's TDAD model from good images (a preset plus flags, or resume a checkpoint)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from foundation.errors import ConfigError, DataError
from inspector.commands.common import device_arg
from tdad.manifest import RECONSTRUCTIONS, ModelConfig
from tdad.nets.segmenter import FINE_BOOST, MEMORY_BOOST
from tdad.preprocess import RESIZE_MODES
from tdad.tiling import DEFECT_TILE_OVERLAP
from tdad.training.distributed import Ranks
from tdad.training.synthesis import TEXTURE_MIXES
from tdad.training.train import (
    DEFAULT_FINE_MEMORY,
    PRESETS,
    SELECTION_HOLDOUT,
    TrainConfig,
    checkpoint_finished,
    read_checkpoint_config,
    train_sku,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector train`, grouped so the ones an operator uses come first."""
    import torch

    parser.description = (
        "Train a SKU from good images. The usual call is `inspector train --sku NAME --data DIR` (add --quick for "
        "a first model in about a minute); the memory boost and fine memory are then chosen on a "
        "held-out slice of those images with synthetic defects (and --ng scrap parts), never on a test split.")
    what = parser.add_argument_group("what to train")
    where = what.add_mutually_exclusive_group(required=True)
    where.add_argument("--sku", help="SKU name from inspector.toml; trains into its model_dir")
    where.add_argument("--out", type=Path, help="SKU directory to write")
    what.add_argument("--data", type=Path, help="training data root (required unless --resume)")
    what.add_argument("--dataset", choices=("folder", "mvtec", "visa"), default="folder",
                      help="layout of --data (default folder: every image under it, all good; mvtec/visa read "
                           "their train split only)")
    what.add_argument("--category", help="mvtec/visa category, e.g. bottle")

    line = parser.add_argument_group("what the line knows (settings are chosen from these)")
    line.add_argument("--min-defect-px", type=float, metavar="PX",
                      help="the smallest defect that must be caught, in camera px (e.g. 12): when the whole image "
                           "at the model size would shrink it under 4 model px, the SKU is inspected in tiles at "
                           "the scale that keeps it (default: whole images)")
    line.add_argument("--ng", type=Path, metavar="DIR",
                      help="a folder of scrap parts (5-20 is plenty), weighted above the synthetic defects when "
                           "choosing settings; never trained on")
    line.add_argument("--ng-masks", type=Path, metavar="DIR",
                      help="masks of the --ng images (<stem>_mask.png or <stem>.png), if any")
    line.add_argument("--holdout", type=float, metavar="F",
                      help=f"share of the good images held out of training to choose settings on (default "
                           f"{SELECTION_HOLDOUT:g}; sets under 10 images hold nothing out)")

    how = parser.add_argument_group("how long")
    how.add_argument("--quick", action="store_true",
                     help="the memory prior alone, no network trained: a SKU the daemon runs in about a minute, to "
                          "inspect while the full model trains (train that into another --out and change over)")
    how.add_argument("--preset", choices=tuple(PRESETS), default="small",
                     help="image size, width, batch and steps per phase (tiny: a few CPU minutes at 64 px; "
                          "small: the CPU default, 128 px; full: 256 px; gpu: 256 px at twice the width, "
                          "for a CUDA box)")
    how.add_argument("--resume", action="store_true",
                     help="continue the checkpoint in <out>/train_state (on a finished run: choose settings again, "
                          "or apply --memory-boost/--fine-memory/--fine-boost, in a minute)")
    how.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                     help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU)")
    how.add_argument("--threads", type=int, default=0,
                     help="torch intra-op and OpenCV threads of the training process (0 = the CPUs this process "
                          "may use minus --num-workers), so threads + workers never exceed the cores; with "
                          "another job on the box, give each its share")
    how.add_argument("--num-workers", type=int, default=0,
                     help="batch-synthesis worker processes, one torch and one OpenCV thread each")
    how.add_argument("--checkpoint-every", type=int, default=500,
                     help="steps between checkpoints (Ctrl-C also writes one)")
    how.add_argument("--seed", type=int, default=0, help="seed of the synthesis, sampling and initialisation")

    chosen = parser.add_argument_group("settings chosen for you (give one to fix it by hand)")
    chosen.add_argument("--no-select", dest="select", action="store_false",
                        help="keep the settings as given instead of choosing them on the validation slice")
    chosen.add_argument("--memory-boost", type=float,
                        help=f"how far inference trusts the memory prior over reconstruction evidence: logit per "
                             f"unit of memory distance added to the learnt gain (chosen; {MEMORY_BOOST:g} with "
                             f"--no-select); inference-only, so --resume --memory-boost B rewrites a finished run")
    chosen.add_argument("--fine-memory", type=int, metavar="N",
                        help="normal descriptors stored on a grid twice as fine (4 px cells at the model size), "
                             f"whose distance joins the map at inference (default {DEFAULT_FINE_MEMORY}; selection "
                             "drops it when it does not pay; 0 = none)")
    chosen.add_argument("--fine-boost", type=float,
                        help=f"logit per unit of fine-memory distance (chosen; {FINE_BOOST:g} with --no-select)")
    chosen.add_argument("--tile-scale", type=float, metavar="F",
                        help="inspect in tiles at this scale (model px per camera px) instead of what "
                             "--min-defect-px implies: 1.0 = native resolution; 0.25 = a 2448x2048 frame becomes "
                             "612x512 and 5x4 tiles of 128; stored in the SKU")
    chosen.add_argument("--tile-overlap", type=float, metavar="F",
                        help="with --tile-scale: share of a tile its neighbours overlap at least, in [0, 0.5) "
                             f"(default 0; {DEFECT_TILE_OVERLAP:g} when --min-defect-px picks the scale)")

    capacity = parser.add_argument_group("model capacity (the presets set these)")
    capacity.add_argument("--image-size", type=int, help="model input size in px (small preset: 128)")
    capacity.add_argument("--width", type=float,
                          help="network widths times this (1 = the CPU default; 2 = twice the channels, about four "
                               "times the compute), stored in the SKU")
    capacity.add_argument("--seg-width", type=float,
                          help="the segmenter decoder's widths times this instead of --width (default: --width)")
    capacity.add_argument("--batch-size", type=int,
                          help="images per training step (small preset: 8); under torchrun the global batch, split "
                               "among the processes")

    memory = parser.add_argument_group("memory prior (the presets set these)")
    memory.add_argument("--memory", type=int,
                        help="normal patch descriptors the segmenter compares each patch with in training (0 = "
                             "none; capped at the training set's patches)")
    memory.add_argument("--inference-memory", type=int,
                        help="entries the SKU stores and inference searches, at least --memory (small preset: "
                             "65536; --memory alone stores --memory)")

    schedule = parser.add_argument_group("schedule (the presets set these)")
    schedule.add_argument("--ae-steps", type=int, help="autoencoder steps (small preset: 1500)")
    schedule.add_argument("--diffusion-steps", type=int, help="denoiser and fusion steps (small preset: 3000)")
    schedule.add_argument("--seg-steps", type=int, help="segmenter steps (small preset: 1500)")
    schedule.add_argument("--lr", type=float, help="peak learning rate of every phase (default 5e-4)")
    schedule.add_argument("--no-amp", dest="amp", action="store_false",
                          help="train in float32 on CUDA instead of under bf16 autocast (no effect on the CPU)")

    research = parser.add_argument_group("research and ablation (for an ML engineer)")
    research.add_argument("--textures", choices=TEXTURE_MIXES, default="builtin",
                          help="what synthetic training anomalies are filled with besides the image's own patches "
                               "and plain colour: builtin (default, an offline bank) or self")
    research.add_argument("--texture-dir", type=Path,
                          help="folder of anomaly source textures (e.g. DTD), used instead of the built-in bank")
    research.add_argument("--foreground", choices=("otsu", "none"), default="otsu",
                          help="where synthetic anomalies go: the Otsu object (default) or anywhere (textures)")
    research.add_argument("--resize", choices=RESIZE_MODES, default="stretch",
                          help="how non-square images become the square model input: stretch (default), "
                               "letterbox or crop")
    recon = research.add_mutually_exclusive_group()
    recon.add_argument("--reconstruction", choices=RECONSTRUCTIONS, default="two_stage",
                       help="what the segmenter compares the input with (default two_stage, the product); others "
                            "are ablation SKUs (torch backend only) that skip the phases they do not need")
    recon.add_argument("--no-reconstruction", dest="reconstruction", action="store_const", const="none",
                       help="same as --reconstruction none (the ablation baseline of inspector eval --compare-sku)")
    research.add_argument("--decoded-reconstruction", dest="residual", action="store_false",
                          help="feed the segmenter decode(z_rec) instead of x + decode(z_rec) - decode(z0) "
                               "(an ablation)")


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
        if selects(args, cfg.memory) and args.fine_memory is None and not cfg.fine_memory:
            runtime["fine_memory"] = DEFAULT_FINE_MEMORY  # so that selection can weigh it
        return boost_applies(dataclasses.replace(cfg, **runtime), args), True
    if args.data is None:
        raise DataError("inspector train: --data DIR is required (the folder of good images or the data set root)")
    if args.tile_overlap is not None and args.tile_scale is None:
        raise ConfigError("--tile-overlap needs --tile-scale (the overlap of the tiles a tiled SKU is inspected in)")
    if args.tile_scale is not None and args.min_defect_px is not None:
        raise ConfigError(f"--tile-scale {args.tile_scale:g} and --min-defect-px {args.min_defect_px:g} both set "
                          "the inspection scale: give one of them")
    knobs = dict(PRESETS[args.preset])
    memory = args.memory if args.memory is not None else knobs.get("memory", 0)
    if args.memory is not None and args.inference_memory is None:
        knobs["inference_memory"] = 0  # --memory alone sets the memory searched and stored, as before the split
    if args.inference_memory is not None and args.inference_memory < memory:
        raise ConfigError(f"--inference-memory {args.inference_memory} is below --memory {memory}: inference "
                          "searches at least what training did; raise it or drop it")
    for name in ("image_size", "width", "seg_width", "batch_size", "memory", "inference_memory", "memory_boost",
                 "fine_memory", "fine_boost", "ae_steps", "diffusion_steps", "seg_steps", "lr", "holdout"):
        if getattr(args, name) is not None:
            knobs[name] = getattr(args, name)
    memory = knobs.get("memory", 0)
    if args.quick and memory:  # nothing is trained: the memory is filled once, at the size inference searches
        knobs["memory"] = knobs["inference_memory"] = max(memory, knobs.get("inference_memory", 0))
    if selects(args, memory):  # a validation slice to choose on, and a fine memory for the choice to weigh
        knobs.setdefault("holdout", SELECTION_HOLDOUT)
        knobs.setdefault("fine_memory", DEFAULT_FINE_MEMORY)
    if args.ng is not None and not selects(args, memory):
        raise ConfigError(f"--ng {args.ng}: scrap parts only feed setting selection, which this run skips "
                          "(--no-select, a fixed --memory-boost/--fine-boost or no --memory); drop one of them")
    tile_scale, tile_overlap = args.tile_scale, args.tile_overlap or 0.0
    if args.min_defect_px is not None:
        tile_scale = defect_scale(args, knobs.get("image_size", TrainConfig.image_size))
        tile_overlap = DEFECT_TILE_OVERLAP if tile_scale is not None else 0.0
    cfg = TrainConfig(data=args.data, out=out, dataset=args.dataset, category=args.category, seed=args.seed,
                      device=args.device, texture_dir=args.texture_dir, textures=args.textures,
                      foreground=args.foreground,
                      num_workers=args.num_workers, threads=args.threads, checkpoint_every=args.checkpoint_every,
                      resize=args.resize, reconstruction=args.reconstruction, residual=args.residual, amp=args.amp,
                      tile_scale=tile_scale, tile_overlap=tile_overlap, min_defect_px=args.min_defect_px,
                      quick=args.quick, **knobs)
    ModelConfig(image_size=cfg.image_size).widened(cfg.width, cfg.seg_width)  # validates size and widths first
    return boost_applies(cfg, args), False


def selects(args: argparse.Namespace, memory: int) -> bool:
    """Whether the run chooses its settings on the validation slice: not with --no-select, a boost fixed by hand
    or no memory prior (the settings chosen are the memory's)."""
    return bool(args.select and memory and args.memory_boost is None and args.fine_boost is None)


def defect_scale(args: argparse.Namespace, image_size: int) -> float | None:
    """The tile scale --min-defect-px implies for the training images' sizes (None: whole images), printed with
    what it means per frame (inspection_scale_line), since the operator's one number decides the frame cost."""
    from foundation.images import image_hw
    from tdad.tiling import scale_for_defect
    from tdad.training.data import open_dataset

    records = open_dataset(args.dataset, args.data, args.category, "train", image_size).records
    sizes = [image_hw(r.path) for r in records]
    try:
        scale = scale_for_defect(args.min_defect_px, sizes, image_size)
    except ValueError as exc:
        raise ConfigError(f"--min-defect-px {args.min_defect_px:g}: {exc}") from None
    print(inspection_scale_line(args.min_defect_px, sizes, image_size, scale))
    return scale


def inspection_scale_line(min_defect_px: float, sizes_hw: list[tuple[int, int]], image_size: int,
                          scale: float | None) -> str:
    """What --min-defect-px chose, on the median-sized training image: whole images, or the tiles each frame is
    cut into (each tile one engine pass, so the frame costs that many whole-image frames)."""
    from tdad.tiling import DEFECT_MODEL_PX, TilePlan, scaled_hw

    h, w = sorted(sizes_hw, key=lambda hw: hw[0] * hw[1])[len(sizes_hw) // 2]
    said = f"--min-defect-px {min_defect_px:g}"
    if scale is None:
        covered = min_defect_px * min(image_size / h, image_size / w)
        return (f"{said}: whole images; on a {w}x{h} image such a defect covers {covered:.1f} model px of "
                f"{image_size} ({DEFECT_MODEL_PX:g} are needed)")
    sh, sw = scaled_hw(h, w, scale)
    plan = TilePlan.fit(sh, sw, image_size, DEFECT_TILE_OVERLAP)
    return (f"{said}: inspected in tiles at {scale:g} model px per camera px; a {w}x{h} image becomes {sw}x{sh}, "
            f"{len(plan.xs)}x{len(plan.ys)} tiles of {image_size} px, so a frame costs {len(plan)} engine passes")


def refuse_scrap_among_good(cfg: TrainConfig, ng: Path) -> None:
    """DataError when a --ng scrap part is also one of the good training images (by content, so copies count):
    the memory would hold it as normal while selection scores it as a defect."""
    from tdad.training.data import FolderDataset, content_digests, copies_among, open_dataset

    good = set(content_digests(open_dataset(cfg.dataset, cfg.data, cfg.category, "train",  # type: ignore[arg-type]
                                            cfg.image_size)))
    scrap = FolderDataset(ng, cfg.image_size)
    both = copies_among(scrap, good)
    if both:
        raise DataError(f"{len(both)} of the {len(scrap.records)} scrap parts under {ng} (e.g. {both[0]}) are also "
                        f"good training images under {cfg.data}: a part is one or the other; take it out of one "
                        "folder")


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
    """`inspector train`: exit 0 when the SKU directory is written (its settings chosen on the validation slice
    unless fixed by hand), 130 when interrupted (checkpointed). Under torchrun rank 0 alone chooses and reports."""
    cfg, resume = config_from_args(args)
    if args.ng is not None:
        refuse_scrap_among_good(cfg, args.ng)  # before the training, not after it
    try:
        out = train_sku(cfg, resume=resume)
    except KeyboardInterrupt:
        return 130
    if not Ranks.from_env().lead:
        return 0
    if not checkpoint_finished(out):  # stopped early with a checkpoint (stop_after): nothing to choose settings for yet
        return 0
    if selects(args, cfg.memory):
        from calibration.selection import NoValidationSlice, format_selection, select_settings

        try:
            print(format_selection(select_settings(out, cfg, args.ng, args.ng_masks)))
        except NoValidationSlice as exc:  # the SKU is whole, at the settings --no-select would have given it
            print(f"settings not chosen: {exc}; the SKU keeps the defaults (memory boost {cfg.memory_boost:g}, "
                  f"fine memory weight {cfg.fine_boost:g}). Add good images and train again, or train --quick, "
                  "which chooses on every image")
    print(f"SKU written to {out}; next: inspector export --sku-dir {out}, then inspector calibrate")
    return 0
