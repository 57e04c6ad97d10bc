"""Where a frame's time goes in the torch engine: a per-stage table from torch.profiler (CUDA kernel time on a GPU).

    python bench/gpu_profile.py --random-sku var/gpu-bench-sku --memory 16384 --device cuda --batch 1 --iters 20
    python bench/gpu_profile.py --sku-dir D --device cuda --engine torch+channels_last+preprocess_on_device
    .venv/bin/python bench/gpu_profile.py --random-sku /tmp/p --image-size 64 --steps 1+1 --iters 2 --threads 1

The engine runs eagerly: a replayed CUDA graph is one launch the profiler cannot split into stages, and a compiled
forward pass fuses across them, so `compile` is refused here. Per frame batch, averaged over --iters: "host ms" is
the CPU's time per stage (on a GPU mostly kernel launches, which a graph replay removes), "device ms" the GPU's
kernel time (what a graph replay still costs), "kernels" the launches. The stages: preprocess (on the host, and on
the device with preprocess_on_device), H2D, encoder, stage-1 (its DDIM steps, from the encoder's end to the
fusion), fusion, stage-2 (to the decoder), decoder (both decodes of a residual SKU in one call), backbone (every
segmenter backbone pass: the image with its reconstruction, and the 2x image of a fine memory), segmenter (the
rest: fusion convs, memory searches, decoder heads), D2H; "other" is what falls between (the residual sum, casts).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from engines.runtime import create_engine
from engines.runtime.benchmark import make_random_sku, parse_engines
from foundation.errors import InspectorError
from tdad.manifest import MANIFEST_FILE
from tdad.preprocess import preprocess_tensor

# the table's rows, in the order a frame meets them; the ranges of the forward pass come from module hooks
TOP_LEVEL = ("preprocess", "H2D", "encoder", "stage-1", "fusion", "stage-2", "decoder", "segmenter", "D2H")
FRAME = "frame"


class StageRanges:
    """Profiler ranges opened and closed by forward hooks on the model's modules: each module's own calls, and the
    two DDIM stages between them (stage 1 from the encoder's end to the fusion's start, stage 2 from the fusion's
    end to the decoder's start), so the model itself stays as it runs in the engine."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.open: dict[str, Any] = {}
        self.handles: list[Any] = []
        self._wrap(model.encoder, "encoder", after=("stage-1",))
        self._wrap(model.fusion, "fusion", before=("stage-1",), after=("stage-2",))
        self._wrap(model.decoder, "decoder", before=("stage-1", "stage-2"))
        self._wrap(model.segmenter, "segmenter")
        self._wrap(model.segmenter.backbone, "backbone")

    def begin(self, name: str) -> None:
        """Open the range `name`."""
        self.open[name] = record_function(name)
        self.open[name].__enter__()

    def end(self, name: str) -> None:
        """Close the range `name` when it is open."""
        mark = self.open.pop(name, None)
        if mark is not None:
            mark.__exit__(None, None, None)

    def _wrap(self, module: torch.nn.Module, name: str, before: tuple[str, ...] = (),
              after: tuple[str, ...] = ()) -> None:
        """Hooks around `module`: close `before`, range `name` over the call, then open `after`."""

        def pre(_module: torch.nn.Module, _args: Any) -> None:
            for other in before:
                self.end(other)
            self.begin(name)

        def post(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
            self.end(name)
            for other in after:
                self.begin(other)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def kernels(event: Any) -> int:
    """Device kernels launched inside a profiler event, its children's included."""
    return len(event.kernels) + sum(kernels(child) for child in event.cpu_children)


def stage_table(engine: Any, frames: np.ndarray, iters: int) -> dict[str, dict[str, float]]:
    """{row: {host_ms, device_ms, kernels}} per call of `frames`, averaged over `iters` profiled calls."""
    ranges = StageRanges(engine.model)
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with torch.inference_mode(), profile(activities=activities) as prof:
        for _ in range(iters):
            with record_function(FRAME):
                with record_function("preprocess"):
                    host = engine.host_input(frames)
                with record_function("H2D"):
                    x = host.to(engine.device, non_blocking=True)
                if x.dtype == torch.uint8:
                    with record_function("preprocess"):
                        x = preprocess_tensor(x)
                maps = engine.forward(x)
                with record_function("D2H"):
                    maps.cpu()
    for handle in ranges.handles:
        handle.remove()
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"host_ms": 0.0, "device_ms": 0.0, "kernels": 0.0})
    for event in prof.events():
        if event.device_type == DeviceType.CPU and event.name in (*TOP_LEVEL, "backbone", FRAME):
            row = totals[event.name]
            row["host_ms"] += event.cpu_time_total / 1e3 / iters
            row["device_ms"] += event.device_time_total / 1e3 / iters
            row["kernels"] += kernels(event) / iters
    rows = {name: dict(totals[name]) for name in (*TOP_LEVEL[:-2], "backbone", *TOP_LEVEL[-2:])}
    rows["segmenter"] = {k: v - rows["backbone"][k] for k, v in rows["segmenter"].items()}
    rows["other"] = {k: totals[FRAME][k] - sum(totals[name][k] for name in TOP_LEVEL) for k in totals[FRAME]}
    rows["total"] = dict(totals[FRAME])
    return rows


def format_rows(rows: dict[str, dict[str, float]], cuda: bool) -> str:
    """The stage table as aligned text; the segmenter row excludes the backbone row."""
    lines = [f"{'stage':28} {'host ms':>9} {'device ms':>10} {'kernels':>8}"]
    names = {"segmenter": "segmenter (excl. backbone)"}
    for name, row in rows.items():
        device = f"{row['device_ms']:10.3f}" if cuda else f"{'-':>10}"
        count = f"{row['kernels']:8.0f}" if cuda else f"{'-':>8}"
        lines.append(f"{names.get(name, name):28} {row['host_ms']:9.3f} {device} {count}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile one engine at one batch size and print the stage table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--sku-dir", type=Path, help="SKU directory")
    group.add_argument("--random-sku", type=Path, metavar="DIR", help="an untrained SKU made in DIR if absent")
    parser.add_argument("--image-size", type=int, default=256, help="image size of --random-sku")
    parser.add_argument("--memory", type=int, default=0, help="memory prior entries of --random-sku")
    parser.add_argument("--fine-memory", type=int, default=0, help="fine-memory entries of --random-sku")
    parser.add_argument("--engine", default="torch", help="torch[:precision][+LEVER...] as bench/latency.py takes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20, help="profiled calls (after three unprofiled ones)")
    parser.add_argument("--steps", help="schedule override STEPS1+STEPS2, e.g. 1+1 for a quick run")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    sku_dir = args.sku_dir or args.random_sku
    try:
        if args.random_sku is not None and not (sku_dir / MANIFEST_FILE).is_file():
            make_random_sku(sku_dir, args.image_size, export=False, memory=args.memory, fine_memory=args.fine_memory)
        (settings,) = parse_engines(args.engine, threads=args.threads or None, tensorrt_precision="fp16",
                                    device=args.device, cuda_graphs=False)
        if settings.backend != "torch" or settings.compile != "off":
            raise InspectorError(f"--engine {args.engine!r}: profiles the torch backend without compile")
        override = None
        if args.steps:
            steps1, _, steps2 = args.steps.partition("+")
            override = {"steps1": int(steps1), "steps2": int(steps2 or steps1)}
        engine = create_engine(settings, sku_dir, schedule_override=override)
    except (InspectorError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    frames = np.random.default_rng(0).integers(0, 256, (args.batch, engine.image_size, engine.image_size, 3),
                                               dtype=np.uint8)
    for _ in range(3):
        engine.infer(frames)
    rows = stage_table(engine, frames, args.iters)
    info = engine.describe()
    print(f"torch profile: {info.get('gpu', 'cpu')}, {engine.image_size} px, batch {args.batch}, schedule "
          f"{info['schedule']['steps1']}+{info['schedule']['steps2']}, precision {engine.precision}, levers "
          f"{info['levers']}, memory {engine.model.config.memory_size}, fine memory "
          f"{engine.model.config.fine_memory_size}, {args.iters} iters, eager (no CUDA graph)")
    print(format_rows(rows, engine.device.type == "cuda"))
    if args.json is not None:
        args.json.write_text(json.dumps({"describe": info, "batch": args.batch, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
