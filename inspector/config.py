"""Operator configuration: `inspector.toml` validated by pydantic-settings, with INSPECTOR_* env overrides.

The file is found at `--config`, else `$INSPECTOR_CONFIG`, else `./inspector.toml`. Any environment variable
`INSPECTOR_<SECTION>__<KEY>` (e.g. `INSPECTOR_MQTT__HOST`) overrides the file. Relative paths are resolved
against the config file's folder so a station's config works from any working directory. Every mistake an
operator can make is reported as one `ConfigError` line naming the file, the key path and what is expected.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from engines.runtime.config import BACKEND_NAMES, EngineSettings, OnnxRuntimeSettings
from foundation.errors import ConfigError

DEFAULT_CONFIG = Path("inspector.toml")
CONFIG_ENV = "INSPECTOR_CONFIG"


class _Section(BaseModel):
    """A config table: unknown keys are errors, so a typo never silently falls back to a default."""

    model_config = ConfigDict(extra="forbid")


class LineConfig(_Section):
    """Which line and station this is: the topic root and every verdict carry them."""

    line_id: str = Field("line1", pattern=r"^[A-Za-z0-9_.-]+$", description="production line id (topic part)")
    station_id: str = Field("station1", pattern=r"^[A-Za-z0-9_.-]+$", description="camera station id")


class SyntheticCamera(_Section):
    """Procedural parts with and without defects, for the demo and tests."""

    type: Literal["synthetic"] = Field("synthetic", description="procedural parts (demo, tests)")
    width: int = Field(256, ge=16, le=8192, description="frame width, px")
    height: int = Field(256, ge=16, le=8192, description="frame height, px")
    fps: float = Field(10.0, ge=0.0, description="frames per second; 0 = as fast as the pipeline takes frames")
    frames: int = Field(0, ge=0, description="frames to produce; 0 = endless")
    defect_rate: float = Field(0.2, ge=0.0, le=1.0, description="share of parts drawn with a defect")
    seed: int = Field(0, description="random seed of the parts and defects")
    texture: str = Field("brick", description="a scikit-image texture the parts are made of: brick, grass, gravel, ...")
    brightness_drift_per_frame: float = Field(
        0.0, ge=-0.01, le=0.01, description="lighting drift for drift-watch tests: part n's intensities are "
                                            "multiplied by 1 + this x (n - 1), e.g. -0.0005 = a lamp losing 5 % "
                                            "every 100 parts; 0 = steady")


class FolderCamera(_Section):
    """Replays the images of a folder, in name order."""

    type: Literal["folder"] = Field("folder", description="replay the images of a folder")
    path: Path = Field(description="the folder")
    pattern: str = Field("*.png", description="glob of the files to replay, in sorted name order")
    loop: bool = Field(False, description="start again after the last file (else the run ends)")
    fps: float = Field(0.0, ge=0.0, description="frames per second; 0 = as fast as the pipeline takes frames")


class VideoCamera(_Section):
    """Replays a video file through OpenCV."""

    type: Literal["video"] = Field("video", description="replay a video file (OpenCV)")
    path: Path = Field(description="the video file")
    loop: bool = Field(False, description="start again at the end (else the run ends)")
    fps: float = Field(0.0, ge=0.0, description="frames per second; 0 = as fast as the pipeline takes frames")


class GenTLCamera(_Section):
    """A GenICam camera through a GenTL producer (.cti) loaded by harvesters."""

    type: Literal["gentl"] = Field("gentl", description="a GenICam camera through a GenTL producer")
    cti: Path = Field(description="the vendor's GenTL producer (.cti file)")
    serial: str | None = Field(None, description="the camera's serial number; unset = the camera at `index`")
    index: int = Field(0, ge=0, description="which camera of the producer's list, when `serial` is unset")
    pixel_format: str | None = Field(None, description="Mono8, RGB8, BGR8, RGBa8, BGRa8 or Bayer{RG,GR,GB,BG}8; "
                                                       "unset = the camera's")
    exposure_us: float | None = Field(None, gt=0, description="exposure time, µs; unset = the camera's")
    gain_db: float | None = Field(None, description="analog gain, dB; unset = the camera's")
    trigger: Literal["free_run", "software", "hardware"] = Field(
        "free_run", description="free_run: the camera's own rate; hardware: one frame per line trigger")
    timeout_s: float = Field(2.0, gt=0, description="wait for a frame this long before checking the connection")
    reconnect_min_s: float = Field(0.5, gt=0, description="first back-off when the camera is missing or drops out")
    reconnect_max_s: float = Field(10.0, gt=0, description="longest back-off between reconnect attempts")


CameraConfig = Annotated[
    SyntheticCamera | FolderCamera | VideoCamera | GenTLCamera, Field(discriminator="type")
]


class MqttConfig(_Section):
    """The broker connection and the on-disk spool verdicts wait in while it is unreachable."""

    host: str = Field("127.0.0.1", description="the broker's address")
    port: int = Field(1883, ge=1, le=65535, description="the broker's port (8883 is usual with TLS)")
    client_id: str | None = Field(None, description="MQTT client id; unset = derived from the topic root and pid")
    topic_prefix: str = Field("inspector", pattern=r"^[A-Za-z0-9_./-]+$",
                              description="first part of every topic: <topic_prefix>/<line_id>/<station_id>")
    qos: Literal[0, 1, 2] = Field(1, description="QoS of verdicts, rejects and masks (1: at least once; 2: exactly "
                                                 "once, in a session kept across reconnects: a station bridged to "
                                                 "the plant)")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive; the broker publishes the last will "
                                                            "after 1.5x this without a packet")
    username: str | None = Field(None, description="broker user name (with password_file)")
    password_file: Path | None = Field(None, description="secret file holding the broker password (not "
                                                         "world-readable)")
    tls_ca: Path | None = Field(None, description="CA certificate that signed the broker's; set = TLS")
    tls_cert: Path | None = Field(None, description="this station's client certificate (mutual TLS)")
    tls_key: Path | None = Field(None, description="its private key, a secret file (not world-readable)")
    spool_dir: Path = Field(Path("var/spool"), description="where verdicts wait for the broker (one station per "
                                                           "folder)")
    spool_max_mb: float = Field(256.0, gt=0, description="cap of the spool; beyond it the oldest unsent OK "
                                                         "verdicts are dropped first (counted)")
    reconnect_min_s: float = Field(0.5, gt=0, description="first back-off after the broker connection drops")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest back-off between reconnect attempts")

    def password(self) -> str | None:
        """Read the broker password from `password_file`, refusing a file anyone on the box can read."""
        if self.password_file is None:
            return None
        return read_secret(self.password_file, "mqtt.password_file")


REVIEWS_DIR = "reviews"  # the folder under archive.dir holding operator reviews and their parts, outside the cap


class ArchiveConfig(_Section):
    """Frames kept on disk for review and retraining (the station page's NG strip reads them)."""

    enabled: bool = Field(True, description="keep NG frames (and a sample of OK ones) with their maps")
    dir: Path = Field(Path("var/archive"), description="where they are kept")
    ok_sample_rate: float = Field(0.0, ge=0.0, le=1.0, description="share of OK frames kept too (NG: all)")
    max_mb: float = Field(1024.0, gt=0, description="size cap; the oldest files are deleted first beyond it")


class ServiceConfig(_Section):
    """How the daemon keeps its promise of one verdict per frame."""

    watchdog: bool = Field(True, description="systemd watchdog pings while the threads come round (WatchdogSec "
                                              "in the unit sets the period)")
    queue_depth: int = Field(16, ge=1, le=4096, description="frames waiting for inference; a frame beyond gets "
                                                            "the fail-safe verdict (queue_full)")
    frame_timeout_ms: float = Field(2000.0, gt=0, description="a frame still without a verdict this long after "
                                                              "acquisition gets the fail-safe verdict")
    fail_safe: Literal["ng", "ok"] = Field("ng", description="verdict of a frame that could not be inspected "
                                                             "(engine error, deadline, full queue, corrupt frame)")
    drain_timeout_s: float = Field(10.0, gt=0, description="on SIGTERM, how long frames in flight may take to get "
                                                           "their verdicts")


class DriftConfig(_Section):
    """Drift watch: recent OK parts against the SKU's calibration (inspector/drift.py, docs/operations.md)."""

    enabled: bool = Field(True, description="watch the scores and images of OK parts for slow drift (lamp, "
                                            "material batch, lens); off for SKUs calibrated before drift watch")
    window: int = Field(200, ge=20, le=100_000, description="recent OK parts the statistics are taken over; "
                                                            "bounds are checked once it is full")
    score_p50: float = Field(0.3, gt=0, description="bound on the shift of the OK-score median, as a share of "
                                                    "the calibrated margin (threshold - good p50)")
    score_p90: float = Field(0.3, gt=0, description="bound on the shift of the OK-score p90, as a share of the "
                                                    "calibrated margin (threshold - good p50)")
    near_threshold: float = Field(0.05, gt=0, le=1, description="bound on the share of OK parts scoring at or "
                                                                "above the warning level")
    warning_level: float = Field(0.5, ge=0, lt=1, description="where the warning level lies from the calibrated "
                                                              "good p99 (0) to the threshold (1)")
    brightness: float = Field(0.03, gt=0, description="bound on the relative shift of the median brightness "
                                                     "(mean grey)")
    contrast: float = Field(0.06, gt=0, description="bound on the relative shift of the median contrast "
                                                    "(std of grey)")
    focus: float = Field(0.15, gt=0, description="bound on the relative shift of the median focus (variance of "
                                                "the Laplacian)")
    hysteresis: float = Field(0.7, gt=0, lt=1, description="an alarm clears once its statistic has stayed within "
                                                           "this share of its bound for half a window of parts")


class WebConfig(_Section):
    """The station page and Prometheus /metrics served by the daemon (inspector/web)."""

    enabled: bool = Field(False, description="serve the station page and /metrics")
    host: str = Field("127.0.0.1", description="listen address; anything but loopback needs open_view = true")
    port: int = Field(8080, ge=0, le=65535, description="0 = any free port")
    open_view: bool = Field(False, description="allow viewing from the network (a non-loopback host)")
    token_file: Path | None = Field(None, description="secret file holding the control token; none = no controls")
    allowed_origins: list[str] = Field(default_factory=list,
                                       description="extra Origins allowed to POST controls (a reverse proxy)")
    live_fps: float = Field(5.0, gt=0, le=30, description="most live frames per second sent to each page")
    ng_strip: int = Field(12, ge=1, le=100, description="NG parts shown in the page's strip")

    @model_validator(mode="after")
    def _network_view_is_opt_in(self) -> WebConfig:
        if not is_loopback(self.host) and not self.open_view:
            raise ValueError(f"host {self.host!r} is reachable from the network: set open_view = true to allow "
                             "viewing the station page and /metrics from there, or use host = \"127.0.0.1\"")
        return self

    def read_token(self) -> str | None:
        """The control token from `token_file` (refusing a world-readable or empty file); None = no controls."""
        if self.token_file is None:
            return None
        token = read_secret(self.token_file, "web.token_file")
        if len(token) < 16:
            raise ConfigError(f"web.token_file: {self.token_file} holds {len(token)} characters; use at least 16, "
                              "e.g. `openssl rand -hex 24 > FILE`")
        return token

    def page_url(self, port: int | None = None) -> str:
        """Where the station page is, as a browser or a command on this box reaches it (`port`: the one bound,
        for port = 0)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port if port is None else port}/"


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1 addresses: a listener there cannot be reached from the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SkuConfig(_Section):
    """Everything the daemon needs to inspect one product type."""

    model_dir: Path = Field(description="the SKU folder `inspector train` wrote (model, graphs, calibration)")
    roi: tuple[int, int, int, int] | None = Field(None, description="[x, y, width, height] in frame pixels; "
                                                                    "unset = the whole frame")
    input_size: int | None = Field(None, ge=16, description="model input size; must match the trained model "
                                                            "when set")
    steps1: int | None = Field(None, ge=1, description="stage-1 DDIM steps; unset = as trained (calibrate again "
                                                       "after changing a schedule key)")
    steps2: int | None = Field(None, ge=1, description="stage-2 DDIM steps; unset = as trained")
    t1: int | None = Field(None, ge=1, description="stage-1 start timestep; unset = as trained")
    t2: int | None = Field(None, ge=1, description="stage-2 start timestep; unset = as trained")
    thresholds_file: Path | None = Field(None, description="the SKU's calibration; unset = "
                                                           "<model_dir>/calibration.json")
    publish_mask: Literal["ng", "all", "none"] = Field("ng", description="which verdicts also publish their "
                                                                         "defect mask PNG")
    defect_types: list[str] = Field(
        default_factory=list, description="defect types an operator may give a confirmed defect on the station "
                                          "page's review queue (the exported test/<type> folders); empty = none")
    good_dir: Path | None = Field(None, description="a folder of good parts (as the model sees them) that `inspector "
                                                    "sku update` and the page's Teach re-fit the thresholds on; keep "
                                                    "it apart from the parts taught")

    @field_validator("roi")
    @classmethod
    def _roi_positive(cls, roi: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if roi is not None and (roi[0] < 0 or roi[1] < 0 or roi[2] <= 0 or roi[3] <= 0):
            raise ValueError("expected [x, y, width, height] with x, y >= 0 and width, height > 0")
        return roi

    @field_validator("defect_types")
    @classmethod
    def _defect_types_are_folders(cls, types: list[str]) -> list[str]:
        if any(not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", t) or t == "good" for t in types) \
                or len(set(types)) != len(types):
            raise ValueError("expected distinct folder names of letters, digits, '_', '.' and '-', other than 'good' "
                             "(the exported folder of good parts)")
        return types

    def schedule_override(self) -> dict[str, int]:
        """The schedule fields this SKU overrides (none set = the trained model's schedule)."""
        fields = {"steps1": self.steps1, "steps2": self.steps2, "t1": self.t1, "t2": self.t2}
        return {k: v for k, v in fields.items() if v is not None}

    def calibration_path(self) -> Path:
        """Where this SKU's thresholds live: `thresholds_file`, else `<model_dir>/calibration.json`."""
        return self.thresholds_file or self.model_dir / "calibration.json"


class StoreConfig(_Section):
    """The SKU version store: signed bundles installed side by side, one version active per SKU (inspector sku)."""

    dir: Path = Field(Path("var/skus"), description="where SKU versions live: <dir>/<sku>/versions/<id>, the link "
                                                    "<dir>/<sku>/active and <dir>/<sku>/history.jsonl")
    trusted_keys: list[Path] = Field(default_factory=list,
                                     description="Ed25519 public keys (PEM) whose signed bundles `inspector sku "
                                                 "install` accepts; none = no bundle installs")
    ca_file: Path | None = Field(None, description="CA certificates that verify https bundle URLs; unset = the "
                                                   "system's")


class InspectorConfig(BaseSettings):
    """The whole of `inspector.toml`; one instance per daemon, passed down, never read globally."""

    model_config = SettingsConfigDict(
        env_prefix="INSPECTOR_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    active_sku: str = Field(description="the SKU inspected at start-up (a [skus.<name>] table); switch at run "
                                        "time with {\"sku\": NAME} on <root>/cmd")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe log line "
                                                                                        "written")
    line: LineConfig = Field(LineConfig(), description="where the station is")
    camera: CameraConfig = Field(SyntheticCamera(), description="where frames come from")
    mqtt: MqttConfig = Field(MqttConfig(), description="the broker, credentials and the verdict spool")
    engine: EngineSettings = Field(OnnxRuntimeSettings(), description="the inference backend")
    archive: ArchiveConfig = Field(ArchiveConfig(), description="frames kept for review")
    service: ServiceConfig = Field(ServiceConfig(), description="queue, deadlines, fail-safe and shutdown")
    web: WebConfig = Field(WebConfig(), description="the station page and /metrics")
    drift: DriftConfig = Field(DriftConfig(), description="drift watch: OK parts against the calibration")
    store: StoreConfig = Field(StoreConfig(), description="the SKU version store and the keys it trusts")
    skus: dict[str, SkuConfig] = Field(min_length=1, description="one table per product type")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment overrides first, then the TOML document passed in by `load_config`."""
        return (env_settings, init_settings)

    @field_validator("skus")
    @classmethod
    def _reviews_is_not_a_sku(cls, skus: dict[str, SkuConfig]) -> dict[str, SkuConfig]:
        if REVIEWS_DIR in skus:
            raise ValueError(f"the SKU name {REVIEWS_DIR!r} is taken by the archive's reviews folder; rename the SKU")
        return skus

    @model_validator(mode="after")
    def _active_sku_known(self) -> InspectorConfig:
        if self.active_sku not in self.skus:
            known = ", ".join(sorted(self.skus))
            raise ValueError(f"active_sku {self.active_sku!r} has no [skus.{self.active_sku}] table (known: {known})")
        return self

    @property
    def topic_root(self) -> str:
        """`<prefix>/<line>/<station>`: the root of every topic this station publishes or subscribes."""
        return f"{self.mqtt.topic_prefix}/{self.line.line_id}/{self.line.station_id}"


def resolve_sku(config: InspectorConfig, name: str) -> SkuConfig:
    """Look up a SKU by name; an unknown name is an operator error that lists the known ones."""
    try:
        return config.skus[name]
    except KeyError:
        known = ", ".join(sorted(config.skus))
        raise ConfigError(f"unknown SKU {name!r}: inspector.toml has [skus.*] tables for: {known}") from None


def config_path(path: Path | None) -> Path:
    """The config file to use: the explicit path, else $INSPECTOR_CONFIG, else ./inspector.toml."""
    if path is not None:
        return path
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: Path | None = None) -> InspectorConfig:
    """Read, validate and resolve the operator config; any problem is one ConfigError line."""
    path = config_path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found (pass --config FILE or set {CONFIG_ENV})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    try:
        config = InspectorConfig(**document)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(path, exc)) from None
    _resolve_relative_paths(config, path.resolve().parent)
    return config


def _describe_validation_error(path: Path, exc: ValidationError) -> str:
    """Turn pydantic's error list into one line: file, dotted key path, what was expected."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = _key_path(first["loc"])
    if first["type"] == "extra_forbidden":
        what = "unknown key (check the spelling against the shipped inspector.toml)"
    elif first["type"] == "missing":
        what = "required key is missing"
    elif first["type"] == "union_tag_invalid" and first["loc"][:1] == ("engine",):
        tag = first["input"].get("backend") if isinstance(first["input"], dict) else first["input"]
        what = f"Input should be one of {', '.join(BACKEND_NAMES)} (got {tag!r})"
        loc = "engine.backend"
    elif first["type"] == "union_tag_invalid":
        tag = first["input"].get("type") if isinstance(first["input"], dict) else first["input"]
        what = f"unknown camera type {tag!r} (expected gentl, folder, video or synthetic)"
    else:
        got = first.get("input")
        what = first["msg"] + (f" (got {got!r})" if not isinstance(got, dict) else "")
    if not loc and "active_sku" in first["msg"]:
        loc = "active_sku"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {loc or '<top level>'}: {what}{more}"


# the tag pydantic inserts into an error's location for each discriminated-union section
_UNION_TAGS = {"camera": ("synthetic", "folder", "video", "gentl"), "engine": BACKEND_NAMES}


def _key_path(loc: tuple[int | str, ...]) -> str:
    """Dotted TOML key path from a pydantic location, dropping the union tag that pydantic inserts."""
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[1] in _UNION_TAGS.get(parts[0], ()):
        parts.pop(1)
    return ".".join(parts)


def _resolve_relative_paths(model: BaseModel, base: Path) -> None:
    """Make every relative Path in the config absolute against the config file's folder."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            object.__setattr__(model, name, base / value)
        elif isinstance(value, list) and value and all(isinstance(item, Path) for item in value):
            object.__setattr__(model, name, [item if item.is_absolute() else base / item for item in value])
        elif isinstance(value, BaseModel):
            _resolve_relative_paths(value, base)
        elif isinstance(value, dict):
            for item in value.values():
                if isinstance(item, BaseModel):
                    _resolve_relative_paths(item, base)


def read_secret(path: Path, key: str) -> str:
    """Read a secret file (password, token) after checking that other users cannot read it; ConfigError naming
    the key when this user cannot read it or it is not a UTF-8 text file."""
    check_secret_file(path, key)
    try:
        return path.read_text(encoding="utf-8").strip()
    except PermissionError:
        raise ConfigError(f"{key}: secret file {path} is not readable by {getpass.getuser()}; chown it to the "
                          "service user (mode 600)") from None
    except (OSError, UnicodeDecodeError) as exc:
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{key}: secret file {path} cannot be read ({what}); write the secret as one line of "
                          "text, e.g. `openssl rand -hex 24 > FILE`") from None


def check_secret_file(path: Path, key: str) -> None:
    """Refuse a missing secret file (password, TLS key) or one that any user on the box can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{key}: secret file {path} not found; create it (mode 600, owned by the service user) "
                          "or fix the path") from None
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"{key}: secret file {path} is world-readable (mode {stat.S_IMODE(mode):o}); run chmod 640 {path}"
        )


def masked_dump(config: InspectorConfig) -> dict[str, Any]:
    """The resolved config as plain data for `config check`, with secret contents never included."""
    data = config.model_dump(mode="json")
    mqtt = data["mqtt"]
    if mqtt.get("password_file"):
        mqtt["password_file"] = f"{mqtt['password_file']} (contents not shown)"
    web = data["web"]
    if web.get("token_file"):
        web["token_file"] = f"{web['token_file']} (contents not shown)"
    return data
