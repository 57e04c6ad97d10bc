"""Typed engine settings: one small pydantic model per backend, picked by `backend` (a discriminated union).

Each backend owns its knobs, so an impossible combination (fp16 on ONNX Runtime, bf16 on a torch CPU engine,
`threads` on TensorRT) is a validation error naming the key, caught by `inspector config check` rather than when
the daemon loads the SKU. The `[engine]` table of inspector.toml is exactly one of these models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from foundation.errors import EngineError

DEFAULT_BACKEND = "onnxruntime"
CompileMode = Literal["off", "default", "max-autotune-no-cudagraphs", "reduce-overhead"]
TORCH_LEVERS = ("channels_last", "cudnn_benchmark", "compile", "preprocess_on_device")  # TorchSettings' speed levers


class _EngineSection(BaseModel):
    """Keys every backend shares; unknown keys are errors, so a key of another backend never passes silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: int = Field(1, ge=1, le=256, description="frames inferred together when they queue up")


class OnnxRuntimeSettings(_EngineSection):
    """ONNX Runtime on the CPU: the embedded default. int8 runs the SKU's Q/DQ graphs."""

    backend: Literal["onnxruntime"] = Field("onnxruntime", description="ONNX Runtime on the CPU")
    precision: Literal["fp32", "int8"] = Field("fp32", description="int8 runs the SKU's Q/DQ graphs "
                                                                   "(`inspector export --int8`)")
    threads: int = Field(0, ge=0, description="intra-op CPU threads; 0 = ONNX Runtime's default")


class TorchSettings(_EngineSection):
    """The torch model as trained: the CPU reference, or the GPU engine where TensorRT is not installed."""

    backend: Literal["torch"] = Field("torch", description="the trained torch model")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where it runs")
    device_id: int = Field(0, ge=0, description="CUDA device index (device = cuda)")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="fp16 and bf16 need device = cuda")
    threads: int = Field(0, ge=0, description="CPU threads; 0 = torch's default")
    cuda_graphs: bool = Field(True, description="replay one captured CUDA graph per batch size (device = cuda)")
    # speed levers of the GPU engine, each off until a GPU measures it (docs/gpu.md); on the CPU they run too
    channels_last: bool = Field(False, description="run the networks in the channels-last memory format")
    cudnn_benchmark: bool = Field(False, description="let cuDNN time its kernels for the fixed shapes once "
                                                     "(device = cuda; process-wide)")
    compile: CompileMode = Field("off", description="torch.compile (inductor) each network in this mode; "
                                                    "\"reduce-overhead\" brings CUDA graphs of its own")
    preprocess_on_device: bool = Field(False, description="copy the uint8 frames to the device and convert them "
                                                          "there (a quarter of the bytes; the same numbers)")

    @model_validator(mode="after")
    def _valid_combinations(self) -> TorchSettings:
        if self.precision != "fp32" and self.device != "cuda":
            raise ValueError(f"precision {self.precision!r} needs device = \"cuda\" (the CPU engine runs fp32)")
        if self.compile == "reduce-overhead" and self.device == "cuda" and self.cuda_graphs:
            raise ValueError("compile = \"reduce-overhead\" captures CUDA graphs of its own: set cuda_graphs = "
                             "false, or use compile = \"max-autotune-no-cudagraphs\" with this engine's graphs")
        return self


class TensorRTSettings(_EngineSection):
    """TensorRT plans on an NVIDIA GPU, built by `inspector build` from the SKU's fp32/fp16/int8 graphs."""

    backend: Literal["tensorrt"] = Field("tensorrt", description="TensorRT plans on an NVIDIA GPU (the [gpu] "
                                                               "extra)")
    device_id: int = Field(0, ge=0, description="CUDA device index")
    precision: Literal["fp32", "fp16", "int8"] = Field("fp16", description="which of the SKU's graphs the plan "
                                                                         "is built from")
    cuda_graphs: bool = Field(True, description="replay one captured CUDA graph per batch size")


def _backend_of(value: Any) -> str:
    """The union's tag: `backend` of a table or model; a table without one means the default backend."""
    if isinstance(value, dict):
        return str(value.get("backend", DEFAULT_BACKEND))
    return str(getattr(value, "backend", DEFAULT_BACKEND))


EngineSettings = Annotated[
    Annotated[OnnxRuntimeSettings, Tag("onnxruntime")]
    | Annotated[TorchSettings, Tag("torch")]
    | Annotated[TensorRTSettings, Tag("tensorrt")],
    Discriminator(_backend_of),
]
BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")
_ADAPTER: TypeAdapter[EngineSettings] = TypeAdapter(EngineSettings)


def engine_settings(backend: str = DEFAULT_BACKEND, **fields: Any) -> EngineSettings:
    """Settings for `backend` from keyword values (CLI flags, tests; None = default); EngineError names the key."""
    given = {key: value for key, value in fields.items() if value is not None}
    try:
        return _ADAPTER.validate_python({"backend": backend, **given})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "union_tag_invalid":
            raise EngineError(f"engine.backend: unknown backend {backend!r} (expected {', '.join(BACKEND_NAMES)})"
                              ) from None
        key = ".".join(str(p) for p in first["loc"] if p not in BACKEND_NAMES)
        where = f"engine.{key}" if key else "engine"
        raise EngineError(f"{where}: {first['msg'].removeprefix('Value error, ')} (backend {backend!r})") from None
