"""The onnx backend's CUDA path. Here on CPU: the placement detector on real onnxruntime profiles,
the provider options, synchronize(). With a CUDA GPU and onnxruntime-gpu (`pytest -m gpu`): the
backend on CUDA against torch on CUDA, on the caller's side stream too, bf16 graphs validated
against torch, and a node without a CUDA kernel detected as CPU work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instructrec.engine import Reranker
from instructrec.engine.onnx_backend import (
    GRAPH_FILES, DevicePlacementError, OnnxBackend, cpu_placed_work, cuda_provider_options)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INSTRUCTION = "The user played Mario Kart 8 and Super Smash Bros. Recommend the next game."
TITLES = ["Tetris", "Halo 3 - Xbox 360", "Minecraft", "FIFA 19", "Neon Drift Turbo Kart Racer", "Stardew Valley"]


def _profile(session_file, feeds: dict, providers: list, tmp_path) -> list[dict]:
    """Run a graph once with onnxruntime's profiler on; the profile's events."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(session_file), options, providers=providers)
    session.run(None, feeds)
    return json.loads(open(session.end_profiling()).read())


# ----------------------------------------------------------------------------------- CPU tests
def test_placement_detector_separates_shape_arithmetic_from_compute(tiny_onnx, tmp_path):
    """A real profile of the packed decoder on the CPU provider. Read as if CUDA had been asked,
    every node doing real work is reported and no node of shape arithmetic is; read for the
    CPU provider, nothing is."""
    out, manifest = tiny_onnx
    cfg = manifest["t5_config"]
    L, H, dk = cfg["num_decoder_layers"], cfg["num_heads"], cfg["d_kv"]
    feeds = {"decoder_input_ids": np.full((1, 2, 5), 7, np.int64),
             "decoder_segment_ids": np.array([[[0, 0, 1, 1, 1], [0, 1, 2, -1, -1]]], np.int64),
             "encoder_attention_mask": np.ones((1, 4), np.int64),
             "cross_key_values": np.zeros((L, 2, 1, H, 4, dk), np.float32)}
    events = _profile(out / GRAPH_FILES["decoder"], feeds, ["CPUExecutionProvider"], tmp_path)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert not cpu_placed_work(events, device_provider="CPUExecutionProvider")
    found = cpu_placed_work(events, device_provider="CUDAExecutionProvider")
    ops = {item.split(" ", 1)[0] for item in found}
    assert {"MatMul", "Softmax"} <= ops
    shape_nodes = [e for e in nodes if e["args"]["op_name"] == "Shape"]
    assert shape_nodes and "Shape" not in ops  # [rank] int64: never reported
    assert len(found) < len(nodes)


def test_copy_nodes_are_reported_unless_they_move_a_shape():
    """Host<->device copies, as onnxruntime's profiler reports them on a CUDA session."""
    def event(op, provider, outputs):
        return {"cat": "Node", "name": f"/{op}_node_kernel_time",
                "args": {"op_name": op, "provider": provider, "output_type_shape": outputs}}

    events = [
        event("MemcpyFromHost", "CUDAExecutionProvider", [{"int64": [5, 5]}]),  # position buckets [T, T]
        event("MemcpyFromHost", "CUDAExecutionProvider", [{"int64": [4]}]),  # a shape: fine
        event("Gather", "CPUExecutionProvider", [{"int64": []}]),  # shape arithmetic: fine
        event("MatMul", "CUDAExecutionProvider", [{"float": [1, 5, 64]}]),
        event("Log", "CPUExecutionProvider", [{"float": [5, 5]}]),
        {"cat": "Session", "name": "model_run", "args": {}},
    ]
    found = cpu_placed_work(events)
    assert [item.split(" ", 1)[0] for item in found] == ["MemcpyFromHost", "Log"]
    assert "(/MemcpyFromHost_node)" in found[0] and "[5, 5]" in found[0]


def test_cuda_provider_options_follow_torch_tf32_and_one_arena_policy():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32  # a property of torch's backend module: set and restore by hand
    try:
        matmul.allow_tf32 = False
        options = cuda_provider_options(torch.device("cuda", 1), 123456)
        assert options == {"device_id": "1", "user_compute_stream": "123456",
                           "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}
        matmul.allow_tf32 = True
        assert cuda_provider_options(torch.device("cuda", 0), 7)["use_tf32"] == "1"
    finally:
        matmul.allow_tf32 = before


def test_allow_cpu_nodes_reaches_the_backend_through_from_pretrained(tiny_onnx):
    """The escape hatch of the CUDA placement check is an engine option (no effect on CPU)."""
    strict = Reranker.from_pretrained(tiny_onnx[0], backend="onnx").score(INSTRUCTION, TITLES)
    allowed = Reranker.from_pretrained(tiny_onnx[0], backend="onnx", allow_cpu_nodes=True).score(INSTRUCTION, TITLES)
    np.testing.assert_array_equal(allowed, strict)


def test_synchronize_is_a_no_op_on_cpu(tiny_onnx, tokenizer):
    backend = OnnxBackend.load(tiny_onnx[0], torch.device("cpu"))
    reranker = Reranker(backend, tokenizer, device=torch.device("cpu"))
    before = reranker.score(INSTRUCTION, TITLES)
    backend.synchronize()
    np.testing.assert_array_equal(reranker.score(INSTRUCTION, TITLES), before)


# ----------------------------------------------------------------------------------- GPU tests
def _cuda_onnxruntime() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def cuda_test(test):
    """`gpu`-marked, skipped with the reason where CUDA or onnxruntime-gpu is absent."""
    for mark in (
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the onnx CUDA path is not run"),
        pytest.mark.skipif(not _cuda_onnxruntime(), reason="onnxruntime-gpu (CUDAExecutionProvider) is not installed"),
        pytest.mark.gpu,
    ):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def cuda_pair(tiny_onnx, tiny_t5_dir, tokenizer):
    """Torch on CUDA and the onnx backend on CUDA, same weights, fp32. allow_cpu_nodes: the
    numerics are checked here; the placement has a test of its own."""
    cuda = torch.device("cuda")
    torch_rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda")
    backend = OnnxBackend.load(tiny_onnx[0], cuda, allow_cpu_nodes=True)
    return torch_rr, Reranker(backend, tokenizer, device=cuda)


@cuda_test
def test_onnx_on_cuda_scores_like_torch_on_cuda(cuda_pair):
    torch_rr, onnx_rr = cuda_pair
    want = torch_rr.score(INSTRUCTION, TITLES)
    got = onnx_rr.score(INSTRUCTION, TITLES)
    # fp32 on both sides, TF32 as torch has it (off by default): the CPU test's tolerance, x10
    # for GPU reduction orders.
    np.testing.assert_allclose(got, want, rtol=3e-6, atol=1e-3)


@cuda_test
def test_onnx_on_cuda_follows_the_callers_stream(cuda_pair):
    """The backend reads the caller's stream on every run: scoring from a side stream, with no
    synchronisation by the caller before reading, gives the default stream's scores."""
    torch_rr, onnx_rr = cuda_pair
    want = onnx_rr.score(INSTRUCTION, TITLES)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = onnx_rr.score(INSTRUCTION, TITLES)
    np.testing.assert_array_equal(got, want)
    onnx_rr.backend.synchronize()


@cuda_test
def test_engine_graphs_run_wholly_on_cuda(tiny_onnx):
    """The strict load: no node of our graphs runs on the CPU beyond shape arithmetic, and no
    copy node moves more than a shape. On failure the DevicePlacementError lists the nodes."""
    try:
        OnnxBackend.load(tiny_onnx[0], torch.device("cuda"))
    except DevicePlacementError as e:
        pytest.fail(str(e))


@cuda_test
def test_a_node_without_a_cuda_kernel_is_reported(tmp_path):
    """Unique has no CUDA kernel: onnxruntime runs it on the CPU and copies around it. The
    detector that guards every load names it."""
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Unique", ["h"], ["u"], sorted=1),
         helper.make_node("Mul", ["u", "u"], ["y"])],
        "unique", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    file = tmp_path / "unique.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), file)
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}
    events = _profile(file, feeds, [("CUDAExecutionProvider", {"device_id": "0"})], tmp_path)
    found = cpu_placed_work(events)
    assert any(item.startswith("Unique ") and "CPUExecutionProvider" in item for item in found), found


@pytest.fixture(scope="module")
def bf16_export(tiny_t5_dir, tmp_path_factory):
    """The tiny checkpoint exported in bf16, validated on CUDA: (folder, manifest)."""
    from instructrec.export import export_model

    out = tmp_path_factory.mktemp("bf16") / "export"
    return out, export_model(tiny_t5_dir, out, dtype="bfloat16", validation_device="cuda")


@cuda_test
def test_bf16_graphs_run_wholly_on_cuda(bf16_export):
    """The strict load of the bf16 export (what `instructrec bench --device cuda` runs as
    engine-onnx-bf16): no node on the CPU beyond shape arithmetic, no copy of more than a shape."""
    try:
        OnnxBackend.load(bf16_export[0], torch.device("cuda"))
    except DevicePlacementError as e:
        pytest.fail(str(e))


@cuda_test
def test_bf16_graphs_on_cuda_validate_against_torch_and_rank_alike(bf16_export, tiny_t5_dir, tokenizer):
    """A bf16 export validated on CUDA (every graph and the chain within the bf16 tolerance),
    then scores of the onnx backend against torch bf16 on CUDA, and rankings as fp32's."""
    out, manifest = bf16_export
    assert manifest["dtype"] == "bfloat16"
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["device"] == "cuda"
    cuda = torch.device("cuda")
    onnx_rr = Reranker(OnnxBackend.load(out, cuda, allow_cpu_nodes=True), tokenizer, device=cuda)
    torch_rr = Reranker.from_pretrained(tiny_t5_dir, device="cuda", dtype="bfloat16")
    fp32 = Reranker.from_pretrained(tiny_t5_dir, device="cuda").score(INSTRUCTION, TITLES)
    got, want = onnx_rr.score(INSTRUCTION, TITLES), torch_rr.score(INSTRUCTION, TITLES)
    # bf16 (8 mantissa bits): the export's bf16 tolerance, on sums of ~10 token log-probs
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= 3e-2 * scale
    assert int(np.argmax(got)) == int(np.argmax(fp32))


def test_bf16_where_is_rewritten_to_a_graph_onnxruntime_can_load(tmp_path):
    """A bf16 Where (what masked_fill exports to in a bf16 graph) has no onnxruntime kernel on
    either provider; after where_in_float32 the graph loads, on CPU too, and selects exactly."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from instructrec.export.graphs import where_in_float32

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
         helper.make_node("Cast", ["y"], ["yb"], to=TensorProto.BFLOAT16),
         helper.make_node("Where", ["c", "xb", "yb"], ["w"], name="masked_fill"),
         helper.make_node("Cast", ["w"], ["out"], to=TensorProto.FLOAT)],
        "bf16_where",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [2, 3]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])])
    file = tmp_path / "where.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), file)
    with pytest.raises(Exception, match="Where"):
        ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    assert where_in_float32(file) == 1
    assert where_in_float32(file) == 0  # nothing left to rewrite
    onnx.checker.check_model(onnx.load(str(file)))
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    c = np.array([[True, False, True], [False, True, False]])
    x = np.array([[1.001, 2.5, -3.0], [4.0, 1e-3, 6.0]], np.float32)
    y = np.full((2, 3), torch.finfo(torch.bfloat16).min, np.float32)
    got = session.run(None, {"c": c, "x": x, "y": y})[0]
    want = torch.where(torch.from_numpy(c), torch.from_numpy(x).bfloat16(), torch.from_numpy(y).bfloat16()).float()
    np.testing.assert_array_equal(got, want.numpy())


@cuda_test
def test_onnx_on_the_second_gpu_scores_like_the_first(tiny_onnx, tokenizer):
    """device cuda:1 (while torch's current device is 0): sessions, stream and IO binding all on
    the device asked for."""
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device: cuda:1 is not there")
    scores = []
    for index in (0, 1):
        device = torch.device("cuda", index)
        backend = OnnxBackend.load(tiny_onnx[0], device, allow_cpu_nodes=True)
        scores.append(Reranker(backend, tokenizer, device=device).score(INSTRUCTION, TITLES))
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-6, atol=1e-4)
