"""The SKU manifest (meta.json): one typed record of what a SKU directory holds, read and written only here.

Training writes it (`new_manifest` + `write_manifest`), export adds its record (`with_export`), the fp16/int8
derivation notes its graphs in that record (`with_derived`), and every reader (runtimes, the daemon,
calibration, eval) gets a validated `SkuManifest` from `read_manifest`. Files of an older schema are upgraded
on read (`upgrade`); a file of a newer schema than this code knows is refused with the fix.
Torch-free, so the ONNX Runtime and TensorRT daemons never import torch.

Schema history:
  1  (no "schema_version" key) model, schedule, latent_scale, optional score/train/export records, plus
     top-level image_size/latent_channels copies of the model config.
  2  the same records validated; "score" always present; image_size/latent_channels still written (as
     copies of model.*) for tools that read the JSON directly. Optional export.fp16/export.int8 records of the
     derived graphs (engines/quantize.py) were added later without a version bump: files without them read
     the same, and older readers keep them as extra keys.
  3  adds "preprocess" (how frames become the square model input: resize mode) and "reconstruction" (what
     the segmenter was trained to compare the input with); older files get "stretch" and "two_stage", what
     they were. Versioned so an older daemon refuses a letterbox SKU instead of stretching its frames.
  4  adds "tiling" (null: the whole frame becomes one model input, as before; a record: the frame is scaled
     and cut into overlapping model-size tiles, tdad/tiling.py); older files get null. Versioned so an
     older daemon refuses a tiled SKU instead of squashing a whole line frame into one tile.
  5  adds model.memory_boost (the memory prior's extra logit weight at inference, tdad/nets/segmenter.py);
     older files get 0, what they computed. Versioned so an older daemon's torch engine refuses such a SKU
     instead of computing its maps without the boost its thresholds were calibrated with.
  6  adds model.residual (the segmenter's reconstruction is x + decode(z_rec) - decode(z0), tdad/schedule.py
     residual_reconstruction); older files get false, what they computed. Versioned so an older daemon refuses
     such a SKU instead of feeding its segmenter the plain decode it was not trained on.
  7  adds model.fine_memory_size and model.fine_boost (an inference-only memory of patch descriptors on a grid
     twice as fine, tdad/nets/segmenter.py); older files get 0, what they computed. Versioned so an older
     daemon refuses such a SKU instead of loading weights with tensors it does not know.
     Later, without a bump (older files read the same, older readers keep it as an extra key): "trained_on",
     the content digests of the images trained on or taught, which calibration refuses as good parts.
     Also without a bump: model.memory_only (a quick SKU's map skips the reconstruction); an older reader
     ignores it and runs the reconstruction, whose evidence that SKU zeroed: the same map, slower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field

from foundation.errors import ConfigError, DataError, first_line
from foundation.files import write_text_atomic
from tdad.preprocess import ResizeMode
from tdad.schedule import Schedule
from tdad.scoring import DEFAULT_TOP_K, top_k_for

MANIFEST_FILE = "meta.json"
WEIGHTS_FILE = "model.safetensors"
SCHEMA_VERSION = 7

# The segmenter's second input, from least to most of the model: the input itself, autoencoder round trip,
# stage 1 only, the full two-stage diffusion. A mode needs the networks of every mode before it.
Reconstruction = Literal["none", "autoencoder", "stage1", "two_stage"]
RECONSTRUCTIONS: tuple[str, ...] = get_args(Reconstruction)


@dataclass(frozen=True)
class ModelConfig:
    """Network hyper-parameters; the defaults fit 256 px at >= 5 frames/s on two CPU cores."""

    image_size: int = 256
    latent_channels: int = 4
    ae_channels: tuple[int, int, int] = (16, 32, 64)  # at S/2, S/4, S/8
    denoiser_channels: tuple[int, int, int] = (32, 64, 64)  # at latent h, h/2, h/4
    time_dim: int = 128
    cond_channels: int = 8
    fusion_channels: int = 32
    seg_channels: tuple[int, int, int, int] = (16, 32, 48, 64)  # decoder at strides 2, 4, 8, 16
    memory_size: int = 0  # normal patch descriptors the segmenter compares with (0 = no memory prior)
    memory_boost: float = 0.0  # logit per unit of memory distance added at inference only (Segmenter.forward)
    residual: bool = False  # segmenter's reconstruction x + decode(z_rec) - decode(z0) (training writes true)
    fine_memory_size: int = 0  # normal descriptors on the 2x-finer grid (0 = none; added after training)
    fine_boost: float = 0.0  # logit per unit of fine-memory distance, inference only (Segmenter.forward)
    # a quick SKU: the map is the memory terms alone (Segmenter.memory_map), nothing reconstructed; the untrained
    # networks stay in the weights, their evidence zeroed, so a reader that ignores this computes the same map
    memory_only: bool = False
    # each memory's inference term standardised per map cell against good parts (Segmenter.standardised); the
    # profile itself is in the weights, so SKUs trained before it read distance - 1 as they did
    memory_profile: bool = False

    def __post_init__(self) -> None:
        """Image sizes must divide by 32 (8x latent down-sampling, then two more U-Net halvings)."""
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"image_size={self.image_size}: use a multiple of 32 (e.g. 128 or 256)")

    def widened(self, width: float, seg_width: float | None = None) -> ModelConfig:
        """A copy with every network width (autoencoder, denoiser, fusion, segmenter decoder) times `width`, the
        segmenter decoder's times `seg_width` instead where given, rounded to multiples of 8: the capacity knobs
        between the CPU presets and a GPU-sized model."""
        seg = width if seg_width is None else seg_width
        for name, factor in (("width", width), ("seg_width", seg)):
            if factor <= 0:
                raise ConfigError(f"{name}={factor}: use a positive factor (1 = the CPU default, 2 = twice the "
                                  "channels)")

        def scale(channels: int, factor: float = width) -> int:
            return max(8, round(channels * factor / 8) * 8)

        return dataclasses.replace(
            self, ae_channels=tuple(map(scale, self.ae_channels)),  # type: ignore[arg-type]
            denoiser_channels=tuple(map(scale, self.denoiser_channels)),  # type: ignore[arg-type]
            fusion_channels=scale(self.fusion_channels), time_dim=scale(self.time_dim),
            seg_channels=tuple(scale(c, seg) for c in self.seg_channels))  # type: ignore[arg-type]

    @property
    def latent_size(self) -> int:
        """Latent height/width (image_size / 8)."""
        return self.image_size // 8

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what meta.json stores under "model")."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict` output (lists become tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


class ScoreRecord(BaseModel):
    """How an anomaly map becomes the image score: the mean of its top_k pixels (tdad.scoring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(DEFAULT_TOP_K, ge=1)


class PreprocessRecord(BaseModel):
    """How a frame (or ROI) becomes the model's square input (tdad.preprocess), the same everywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: ResizeMode = "stretch"


class TilingRecord(BaseModel):
    """Tiled inspection (tdad/tiling.py): the ROI is scaled once, then cut into overlapping S x S tiles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(gt=0, le=4, description="model px per source px after the ROI crop; 1.0 = native")
    overlap: float = Field(0.0, ge=0, lt=0.5, description="share of a tile its neighbours overlap at least")


class TrainRecord(BaseModel):
    """What training left behind: the final loss per phase and the TrainConfig it ran with."""

    model_config = ConfigDict(extra="allow", frozen=True)

    losses: dict[str, float] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


class DerivedGraphsRecord(BaseModel):
    """fp16 or int8 graphs derived from the fp32 export (engines/quantize.py): their files and how they were made."""

    model_config = ConfigDict(extra="allow", frozen=True)

    files: list[str]
    tool: str = ""  # dist==version of the converter or quantizer
    calibration: str = ""  # int8: how many good images of which folder
    method: str = ""  # int8: the quantization scheme
    ops: list[str] = Field(default_factory=list)  # int8: the op types given Q/DQ nodes


class ExportRecord(BaseModel):
    """The ONNX export: which weights it came from, the schedule baked into the unrolled graph, derived graphs."""

    model_config = ConfigDict(extra="allow", frozen=True)

    opset: int
    weights_sha256: str
    files: list[str]
    torch: str = ""
    onnx: str = ""
    unrolled_schedule: Schedule | None = None
    denoiser_calls: int = 0
    ddim_timesteps: list[list[int]] = Field(default_factory=list)
    fp16: DerivedGraphsRecord | None = None
    int8: DerivedGraphsRecord | None = None


class SelectionCandidate(BaseModel):
    """One candidate of setting selection (calibration/selection.py) with its metrics on the validation slice's
    synthetic defects and, when the operator gave scrap parts, on those (None: not measured)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    memory_boost: float
    fine_boost: float
    top_k: int
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    aupro: float | None = None
    ng_image_auroc: float | None = None
    ng_pixel_auroc: float | None = None
    ng_aupro: float | None = None
    objective: float

    def key(self) -> tuple[float, float, int]:
        """(memory boost, fine boost, top-k): what the candidate sets."""
        return self.memory_boost, self.fine_boost, self.top_k


class SelectionRecord(BaseModel):
    """How the SKU's inference settings were chosen: the winner, every candidate, and exactly which files fed the
    choice (held-out training images, scrap parts), so a report can show that no test image did."""

    model_config = ConfigDict(extra="allow", frozen=True)

    chosen: SelectionCandidate
    candidates: list[SelectionCandidate]
    validation_files: list[str]
    ng_files: list[str] = Field(default_factory=list)
    ng_digests: list[str] = Field(default_factory=list)  # the scrap parts' content digests: eval spots copies
    good: int
    synthetic_defects: int
    ng: int = 0
    ng_masks: bool = False
    defect_kinds: list[str] = Field(default_factory=list)
    remembered: int = 0  # training images the memory was refilled from once chosen (validation slice included)
    folds: int = 0  # > 0: a quick SKU cross-fitted on every training image in this many folds (calibration.selection)
    seconds: float = 0.0


class TaughtRecord(BaseModel):
    """One `inspector sku update`: good parts whose novel patches joined the memory (tdad/training/teach.py)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    when: str
    source: str  # the folder (or "reviews:<file>") the good parts came from
    data_hash: str  # file-list hash of those parts
    images: int
    memory: tuple[int, int]  # entries before, after
    fine_memory: tuple[int, int] = (0, 0)


class SkuManifest(BaseModel):
    """meta.json of a SKU directory (schema SCHEMA_VERSION)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: int = SCHEMA_VERSION
    model: ModelConfig
    schedule: Schedule
    latent_scale: float = Field(gt=0)
    score: ScoreRecord = Field(default_factory=ScoreRecord)
    preprocess: PreprocessRecord = Field(default_factory=PreprocessRecord)
    reconstruction: Reconstruction = "two_stage"
    tiling: TilingRecord | None = None
    code_version: str = "unknown"
    train_hash: str = ""
    data_hash: str = ""
    created: str = ""
    note: str = ""
    train: TrainRecord | None = None
    export: ExportRecord | None = None
    selection: SelectionRecord | None = None  # how memory boost, fine boost and top-k were chosen (None: by hand)
    taught: list[TaughtRecord] = Field(default_factory=list)  # good parts added to the memory after training
    # content digests of every image the SKU was trained on, held out for selection or taught (sorted; empty in
    # SKUs made before it was recorded): calibration refuses good parts it finds here (they read as normal)
    trained_on: list[str] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def image_size(self) -> int:
        """Input side of the model in pixels (a copy of model.image_size in the file)."""
        return self.model.image_size

    @computed_field  # type: ignore[prop-decorator]
    @property
    def latent_channels(self) -> int:
        """Channels of the latent (a copy of model.latent_channels in the file)."""
        return self.model.latent_channels


def code_version() -> str:
    """The installed tdad-inspector version (recorded in meta.json)."""
    try:
        return version("tdad-inspector")
    except PackageNotFoundError:
        return "unknown"


def new_manifest(model: ModelConfig, schedule: Schedule, latent_scale: float, **records: Any) -> SkuManifest:
    """The manifest of a freshly trained (or random-init) SKU; records: train_hash, data_hash, train, note,
    preprocess, reconstruction, tiling (score defaults to top-k as a share of the map, tdad.scoring.top_k_for)."""
    records.setdefault("score", ScoreRecord(top_k=top_k_for(model.image_size)))
    return SkuManifest(model=model, schedule=schedule, latent_scale=latent_scale, code_version=code_version(),
                       created=datetime.now(UTC).isoformat(timespec="seconds"), **records)


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A meta.json document of any known schema brought to SCHEMA_VERSION (a new dict; the input is kept)."""
    data = dict(data)
    found = data.get("schema_version", 1)
    if not isinstance(found, int) or found > SCHEMA_VERSION:
        raise ValueError(f"schema_version {found!r} is newer than this inspector reads ({SCHEMA_VERSION}); "
                         "upgrade tdad-inspector")
    if found == 1:
        data.setdefault("score", {"top_k": DEFAULT_TOP_K})
    if found < 3:
        data.setdefault("preprocess", {"resize": "stretch"})
        data.setdefault("reconstruction", "two_stage")
    if found < 4:
        data.setdefault("tiling", None)
    data["schema_version"] = SCHEMA_VERSION
    data.pop("image_size", None)  # copies of model.*, recomputed on write
    data.pop("latent_channels", None)
    return data


def read_manifest(sku_dir: Path) -> SkuManifest:
    """meta.json of a SKU directory, upgraded and validated; DataError naming the file when missing or malformed."""
    path = Path(sku_dir) / MANIFEST_FILE
    try:
        return SkuManifest.model_validate(upgrade(json.loads(path.read_text())))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; train the SKU first (inspector train) or fix model_dir") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise DataError(f"{path}: malformed SKU metadata ({where}: {first['msg']}); retrain the SKU") from None
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError, ConfigError) as exc:
        raise DataError(f"{path}: malformed SKU metadata ({first_line(exc)}); retrain the SKU") from None


def file_sha256(path: Path) -> str:
    """Hex digest of a file (ties exported graphs to weights, plans to graphs, calibrations to SKUs)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# the manifest records that shape a SKU's anomaly maps (not its export, train or bookkeeping records)
MAP_SHAPING = {"model", "schedule", "latent_scale", "score", "preprocess", "reconstruction", "tiling"}
# left out, so that SKUs calibrated before the field existed stay valid: memory_only is how a map is computed, not
# what it is; memory_profile's centres and spreads are in the weights, which the fingerprint hashes
NOT_MAP_SHAPING = {"model": {"memory_only", "memory_profile"}}


def maps_fingerprint(sku_dir: Path, schedule_override: Mapping[str, int] | None = None) -> str:
    """sha256 over model.safetensors and the meta.json records that shape the SKU's maps (MAP_SHAPING), with the
    station's schedule override applied (the schedule that runs is hashed, so an override equal to the trained
    value changes nothing): what a calibration records, so thresholds fit before a retraining, a memory boost
    change or another [skus.*] t1/t2/steps are refused, not used. ValueError/TypeError for an invalid override."""
    manifest = read_manifest(sku_dir)
    if schedule_override:
        manifest = manifest.model_copy(update={"schedule": manifest.schedule.with_overrides(**schedule_override)})
    shaping = manifest.model_dump(mode="json", include=MAP_SHAPING, exclude=NOT_MAP_SHAPING)
    text = file_sha256(Path(sku_dir) / WEIGHTS_FILE) + json.dumps(shaping, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(sku_dir: Path, manifest: SkuManifest) -> Path:
    """Write meta.json atomically (foundation.files.write_text_atomic), so a reader never sees half a manifest."""
    path = Path(sku_dir) / MANIFEST_FILE
    write_text_atomic(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def with_export(manifest: SkuManifest, export: ExportRecord) -> SkuManifest:
    """The manifest with a new export record, everything training wrote kept."""
    return manifest.model_copy(update={"export": export})


def with_derived(manifest: SkuManifest, precision: Literal["fp16", "int8"],
                 graphs: DerivedGraphsRecord) -> SkuManifest:
    """The manifest with `graphs` noted in its export record; ValueError when the SKU has no export record."""
    if manifest.export is None:
        raise ValueError("no export record: the derived graphs need the fp32 export first")
    return with_export(manifest, manifest.export.model_copy(update={precision: graphs}))


def score_top_k(sku_dir: Path) -> int:
    """top-k of the image score the SKU was trained with, shared by every consumer."""
    return read_manifest(sku_dir).score.top_k
