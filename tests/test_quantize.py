"""fp16 and int8 Q/DQ graphs derived from the fp32 export: structure, identity, parity on ONNX Runtime, and the
int8 engine's accuracy against fp32 on a trained SKU (CPU, everywhere)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.precision import META_PRECISION, META_SOURCE_SHA256, check_graph, graph_file
from engines.quantize import FP32_PARTS, FP32_SCOPES, GRAPH_NAMES, QUANTIZED_OPS, derive_fp16, quantize_int8
from engines.runtime import create_engine, engine_settings
from engines.runtime.staged import UNROLLED_NAME, file_sha256
from foundation.errors import EngineError
from inspector.cli import main
from tdad.manifest import read_manifest
from tdad.training.sample_data import write_good_folder
from tests.fixtures_engines import IMAGE_SIZE, copy_sku, random_frames
from tests.test_parity import part_frames, rel_error

INT8_RANDOM_BOUND = 0.2  # random-init weights: a loose sanity bound; accuracy is judged on the trained SKU below
FP16_BOUND = 1e-2
INT8_AUROC_POINTS = 2.0


@pytest.fixture(scope="module")
def derived_sku(exported_random_sku: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private random-init SKU with fp16 graphs and int8 graphs calibrated on 4 good parts."""
    root = tmp_path_factory.mktemp("quant")
    sku = copy_sku(exported_random_sku, root / "sku")
    good = write_good_folder(root / "good", 6, IMAGE_SIZE)
    quantize_int8(sku, good, limit=4, threads=1)
    derive_fp16(sku)
    return sku


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# the graphs that hold each fp32 scope's nodes: the segmenter's backbone, and the autoencoder in the unrolled graph
FP32_HOLDERS = {"/backbone/": ("segmenter", UNROLLED_NAME), "/encoder/": (UNROLLED_NAME,),
                "/decoder/": (UNROLLED_NAME,)}


def test_int8_graphs_hold_symmetric_qdq_and_their_source(derived_sku: Path) -> None:
    assert set(FP32_HOLDERS) == set(FP32_SCOPES)
    for name in GRAPH_NAMES:
        path = graph_file(derived_sku, name, "int8")
        model = onnx.load(str(path))
        ops = {n.op_type for n in model.graph.node}
        assert ({"QuantizeLinear", "DequantizeLinear"} <= ops) == (name not in FP32_PARTS), name
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta[META_PRECISION] == "int8"
        assert meta[META_SOURCE_SHA256] == file_sha256(graph_file(derived_sku, name, "fp32"))
        assert check_graph(derived_sku, name, "int8") == path
        if name in FP32_PARTS:  # the autoencoder's part graphs are its fp32 graphs, stamped
            continue
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        zero_points = [inits[n.input[2]] for n in model.graph.node
                       if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
        assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points), name  # TensorRT's form
        dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        for scope, holders in FP32_HOLDERS.items():
            kept = [n for n in model.graph.node if n.op_type == "Conv" and scope in n.name]
            assert bool(kept) == (name in holders), (name, scope)
            assert not any(set(n.input) & dequantized for n in kept), f"{name}: {scope} must stay fp32"
        assert any(n.op_type == "Conv" and set(n.input) & dequantized for n in model.graph.node), name


def test_derived_graphs_are_noted_in_the_manifests_export_record(derived_sku: Path) -> None:
    export = read_manifest(derived_sku).export
    assert export is not None and export.int8 is not None and export.fp16 is not None
    assert export.int8.files == [graph_file(derived_sku, n, "int8").name for n in GRAPH_NAMES]
    assert export.int8.calibration.startswith("4 images of ") and export.int8.ops == list(QUANTIZED_OPS)
    assert export.fp16.files == [graph_file(derived_sku, n, "fp16").name for n in GRAPH_NAMES]
    assert export.fp16.tool.startswith("onnxconverter-common==")
    assert export.weights_sha256 and export.unrolled_schedule is not None  # the fp32 export record is kept


def test_int8_engine_runs_both_paths_close_to_fp32(derived_sku: Path) -> None:
    frames = random_frames(3, seed=2)
    ref = create_engine(engine_settings("onnxruntime", threads=1), derived_sku).infer(frames)
    engine = create_engine(engine_settings("onnxruntime", threads=1, precision="int8"), derived_sku)
    info = engine.describe()
    assert info["precision"] == "int8" and info["unrolled"]
    maps = engine.infer(frames)
    assert maps.shape == ref.shape and maps.dtype == np.float32
    assert rel_error(maps, ref) < INT8_RANDOM_BOUND
    assert rel_error(engine.infer_timed(frames)[0], ref) < INT8_RANDOM_BOUND  # the int8 part graphs


def test_int8_graphs_quantized_the_old_way_run_and_say_how_to_remake_them(derived_sku: Path, tmp_path: Path) -> None:
    """A SKU whose int8 graphs an earlier version made (the autoencoder quantized too) still loads at int8, and
    the load logs the command that makes them as now; current graphs log nothing."""
    from structlog.testing import capture_logs

    from tdad.manifest import with_derived, write_manifest

    settings = engine_settings("onnxruntime", threads=1, precision="int8")
    with capture_logs() as logs:
        create_engine(settings, derived_sku)
    assert not [e for e in logs if e["event"] == "int8_graphs_outdated"]
    old = copy_sku(derived_sku, tmp_path / "old")
    manifest = read_manifest(old)
    assert manifest.export is not None and manifest.export.int8 is not None
    before = "onnxruntime quantize_static QDQ, symmetric int8, per-channel, minmax; frozen backbone fp32"
    write_manifest(old, with_derived(manifest, "int8", manifest.export.int8.model_copy(update={"method": before})))
    with capture_logs() as logs:
        engine = create_engine(settings, old)
    (warning,) = [e for e in logs if e["event"] == "int8_graphs_outdated"]
    assert before in warning["message"] and f"inspector export --sku-dir {old} --int8 --calib" in warning["message"]
    assert engine.infer(random_frames(1)).shape == (1, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("profile", [False, True], ids=["trained", "quick"])
def test_a_memory_skus_int8_and_fp16_graphs_run_and_keep_the_memory_searches_fp32(tmp_path: Path,
                                                                                  profile: bool) -> None:
    """The product's SKUs have a memory and a fine memory (a quick SKU's with their profiles): their int8 graphs
    run on ONNX Runtime (the quantizer once gave the search's Gemm weight a scalar scale beside per-entry zero
    points, refused at run time), and each search reads its memory unquantized; their fp16 graphs load (the
    search's Cast to float once kept a float output over an fp16 input) and search in fp32."""
    from engines.runtime.benchmark import make_random_sku

    sku = make_random_sku(tmp_path / "sku", IMAGE_SIZE, memory=64, fine_memory=32, profile=profile)
    quantize_int8(sku, write_good_folder(tmp_path / "good", 4, IMAGE_SIZE), threads=1)
    derive_fp16(sku)
    x = np.random.default_rng(3).random((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for name in ("segmenter", UNROLLED_NAME):
        half = onnx.load(str(graph_file(sku, name, "fp16")))
        gemms = [n for n in half.graph.node if n.op_type == "Gemm" and any(i.endswith("memory") for i in n.input)]
        weights = {i.name: i.data_type for i in half.graph.initializer}
        assert len(gemms) == 2 and all(weights[n.input[1]] == onnx.TensorProto.FLOAT for n in gemms), name
        feeds = {"image": x} if name == UNROLLED_NAME else {"image": x, "reconstruction": x}
        full, low = (_session(graph_file(sku, name, p)).run(None, feeds)[0] for p in ("fp32", "fp16"))
        assert np.abs(full - low).max() < 0.01, name
    for name in ("segmenter", UNROLLED_NAME):
        model = onnx.load(str(graph_file(sku, name, "int8")))
        searches = [n for n in model.graph.node if n.op_type == "Gemm" and any(i.endswith("memory") for i in n.input)]
        assert len(searches) == 2, name  # the memory and the fine memory, their weights still the fp32 initializers
        assert {i.name for i in model.graph.initializer} >= {i for n in searches for i in n.input[1:2]}, name
    frames = random_frames(2, seed=4)
    ref = create_engine(engine_settings("onnxruntime", threads=1), sku).infer(frames)
    engine = create_engine(engine_settings("onnxruntime", threads=1, precision="int8"), sku)
    assert rel_error(engine.infer(frames), ref) < INT8_RANDOM_BOUND
    assert rel_error(engine.infer_timed(frames)[0], ref) < INT8_RANDOM_BOUND


def test_a_derived_graph_that_cannot_run_is_refused_where_it_is_written(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The two gaps the memory SKUs had, brought back: export says so in one line instead of writing graphs that
    fail on the station."""
    import engines.quantize as quantize
    from engines.runtime.benchmark import make_random_sku

    sku = make_random_sku(tmp_path / "sku", IMAGE_SIZE, memory=64)
    monkeypatch.setattr(quantize, "search_island", lambda graph: [])
    with pytest.raises(EngineError, match=r"segmenter\.fp16\.onnx: written, but ONNX Runtime cannot run it \(.*"
                                          r"report it"):
        derive_fp16(sku)
    monkeypatch.setattr(quantize, "FP32_INITIALIZERS", ("no such initializer",))
    with pytest.raises(EngineError, match=r"\.int8\.onnx: written, but ONNX Runtime cannot run it"):
        quantize_int8(sku, write_good_folder(tmp_path / "good", 4, IMAGE_SIZE), threads=1)


def test_fp16_graphs_compute_in_fp16_with_fp32_io_and_fp32_timestep_embedding(derived_sku: Path) -> None:
    x = np.random.default_rng(0).random((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for name in ("encoder", "tdad"):
        path = graph_file(derived_sku, name, "fp16")
        model = onnx.load(str(path))
        types = [i.data_type for i in model.graph.initializer if i.data_type in (1, 10)]
        assert types.count(onnx.TensorProto.FLOAT16) > types.count(onnx.TensorProto.FLOAT), name
        session = _session(path)
        assert [i.type for i in (*session.get_inputs(), *session.get_outputs())] == ["tensor(float)"] * 2
        ref = _session(graph_file(derived_sku, name, "fp32")).run(None, {"image": x})[0]
        assert rel_error(session.run(None, {"image": x})[0], ref) < FP16_BOUND, name
    denoiser = onnx.load(str(graph_file(derived_sku, "denoiser", "fp16")))
    shapes = onnx.shape_inference.infer_shapes(denoiser).graph
    sin_inputs = {n.input[0] for n in denoiser.graph.node if n.op_type in ("Sin", "Cos")}
    kinds = {v.name: v.type.tensor_type.elem_type for v in (*shapes.value_info, *shapes.input)}
    assert sin_inputs and all(kinds[i] == onnx.TensorProto.FLOAT for i in sin_inputs)


def test_stale_or_missing_derived_graphs_are_refused_with_the_export_command(derived_sku: Path,
                                                                             tmp_path: Path) -> None:
    sku = copy_sku(derived_sku, tmp_path / "sku")
    encoder = graph_file(sku, "encoder", "fp32")
    model = onnx.load(str(encoder))
    model.doc_string = "re-exported"  # same network, different bytes: as after a new `inspector export`
    onnx.save(model, str(encoder))
    with pytest.raises(EngineError, match=r"encoder\.int8\.onnx was not made from the current encoder\.onnx.*"
                                          r"--int8 --calib DIR"):
        create_engine(engine_settings("onnxruntime", precision="int8"), sku)
    graph_file(sku, "fusion", "int8").unlink()
    with pytest.raises(EngineError, match=r"fusion\.int8\.onnx is missing \(the SKU has no int8 graphs\)"):
        check_graph(sku, "fusion", "int8")


def test_export_int8_without_calibration_images_is_one_line(exported_random_sku: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--sku-dir", str(exported_random_sku), "--int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --int8 needs --calib DIR: a folder of the SKU's good images to calibrate on"


@pytest.mark.slow
def test_int8_keeps_the_trained_skus_image_auroc(trained_sku: Path, tmp_path: Path) -> None:
    from calibration.metrics import image_auroc
    from tdad.scoring import image_scores

    sku = copy_sku(trained_sku, tmp_path / "sku")
    size = create_engine(engine_settings("onnxruntime", threads=1), sku).image_size
    quantize_int8(sku, write_good_folder(tmp_path / "good", 16, size, seed=7), limit=16, threads=1)
    frames = part_frames(48, size, seed=5)
    labels = np.arange(48) % 2
    auroc = {p: image_auroc(labels, image_scores(create_engine(engine_settings("onnxruntime", threads=1,
                                                                               precision=p), sku).infer(frames)))
             for p in ("fp32", "int8")}
    assert abs(auroc["int8"] - auroc["fp32"]) * 100 <= INT8_AUROC_POINTS, auroc


def test_a_tiled_skus_int8_calibration_images_are_tiles_at_its_scale(tmp_path: Path) -> None:
    from engines.quantize import calibration_images
    from tdad.manifest import TilingRecord

    folder = write_good_folder(tmp_path / "good", 3, 160, "brick", seed=2)  # 160 px at 0.5: 80 px, 2 x 2 tiles
    tiles = calibration_images(folder, 64, 100, tiling=TilingRecord(scale=0.5))
    assert tiles.shape == (3 * 4, 64, 64, 3) and tiles.dtype == np.uint8
    assert calibration_images(folder, 64, 5, tiling=TilingRecord(scale=0.5)).shape == (5, 64, 64, 3)
    assert calibration_images(folder, 64, 100).shape == (3, 64, 64, 3)  # untiled: whole images, as before
