"""`inspector eval`: evaluate a SKU on a labelled test split per schedule; table, JSON/Markdown report, montages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from calibration.evaluate import METRIC_COLUMNS, evaluate, format_table
from calibration.thresholds import load_calibration
from engines.data import file_list_hash, open_dataset
from engines.manifest import score_top_k
from engines.runtime import create_engine
from foundation.errors import ConfigError
from foundation.log import get_logger
from inspector.commands.common import add_engine_arguments, sku_target

log = get_logger(__name__)


def parse_steps(text: str) -> list[tuple[int, int]]:
    """'1+1,2+2,5+5' -> [(1, 1), (2, 2), (5, 5)]; ConfigError naming --steps on anything else."""
    pairs = []
    for part in text.split(","):
        try:
            first, second = (int(v) for v in part.strip().split("+"))
        except ValueError:
            raise ConfigError(f"--steps {text!r}: expected steps1+steps2 pairs like 1+1,2+2,5+5") from None
        if first < 1 or second < 1:
            raise ConfigError(f"--steps {text!r}: step counts must be >= 1")
        pairs.append((first, second))
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `inspector eval`."""
    add_engine_arguments(parser)
    parser.add_argument("--dataset", choices=("mvtec", "visa", "folder"), required=True, help="test set layout")
    parser.add_argument("--root", type=Path, required=True, help="data set root folder")
    parser.add_argument("--category", help="MVTec AD / VisA category (e.g. bottle)")
    parser.add_argument("--steps", help="schedules to compare as steps1+steps2 pairs, e.g. 1+1,2+2,5+5")
    parser.add_argument("--out", type=Path, help="report folder (default var/eval/<sku dir name>)")


def run(args: argparse.Namespace) -> int:
    """Evaluate the SKU on the test split once per schedule; print the table, write the reports and montages."""
    target = sku_target(args)
    out = args.out or Path("var") / "eval" / target.sku_dir.name
    out.mkdir(parents=True, exist_ok=True)
    top_k = score_top_k(target.sku_dir)
    calibration = load_calibration(target.calibration_path) if target.calibration_path.is_file() else None
    schedules = parse_steps(args.steps) if args.steps else [None]
    dataset = None
    rows: list[dict[str, Any]] = []
    for pair in schedules:
        override = dict(target.schedule_override)
        if pair is not None:
            override.update(steps1=pair[0], steps2=pair[1])
        engine = create_engine(target.engine, target.sku_dir, schedule_override=override or None)
        if dataset is None:
            dataset = open_dataset(args.dataset, args.root, args.category, "test", engine.image_size)
        label = "trained" if pair is None else f"{pair[0]}+{pair[1]}"
        montage = out / ("montage.png" if pair is None else f"montage_{pair[0]}+{pair[1]}.png")
        result = evaluate(
            engine, dataset, batch_size=args.batch, top_k=top_k, calibration=calibration, montage_path=montage
        )
        rows.append({"schedule": label, "engine": engine.describe(), **result})
        log.info("eval_schedule_done", schedule=label, **{k: result[k] for k in METRIC_COLUMNS})
    report = {
        "sku_dir": str(target.sku_dir),
        "backend": target.engine.backend,
        "dataset": {
            "kind": args.dataset,
            "root": str(args.root),
            "category": args.category,
            "n_images": len(dataset) if dataset is not None else 0,
            "data_hash": file_list_hash(dataset) if dataset is not None else "",
        },
        "score_top_k": top_k,
        "calibration": calibration.model_dump(mode="json") if calibration else None,
        "rows": rows,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    title = f"# Evaluation of {target.sku_dir.name} on {args.dataset} {args.category or ''}".rstrip()
    montages = "\n".join(f"![{row['schedule']}]({Path(row['montage']).name})" for row in rows)
    (out / "report.md").write_text(f"{title}\n\n{format_table(rows, markdown=True)}\n\n{montages}\n")
    print(format_table(rows))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and montages")
    return 0
