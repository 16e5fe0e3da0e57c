"""Where onnxruntime's CUDA provider would run the engine's graphs, decided on CPU from the graph files.

onnxruntime's CUDA provider claims every node it has a kernel for, then hands some back to the
CPU provider: `GetCpuPreferredNodes` (onnxruntime/core/framework/fallback_cpu_capability.cc, the
version without the backward trace that onnxruntime >= 1.17 ships). Its rule, which
`cpu_preferred_nodes` below follows step by step:
- seeds: the outputs a CUDA kernel writes to host memory (Shape, Size: `OutputMemoryType
  <OrtMemTypeCPUInput>(0)` in their CUDA registrations) are host tensors; their consumers are
  candidates, visited in topological order;
- a candidate goes to the CPU when none of its inputs is float16/bfloat16 and every input is a
  small initializer (<= 100 elements), a graph input, or a host tensor that its CUDA kernel does
  NOT read from host memory (a Reshape's shape input, declared `InputMemoryType<OrtMemTypeCPUInput>
  (1)`, stops the walk there: the Reshape itself stays on the GPU);
- the outputs of a node sent to the CPU are host tensors, its consumers new candidates.
So a chain Shape -> Gather -> Range -> Unsqueeze -> Sub -> ... goes to the CPU node by node
(CUDA's Range reads start/limit/delta from device memory, so a host `limit` does not stop the
walk), and the first node that also reads a device tensor or a large initializer (the
relative-bias embedding table) stays on the GPU and gets the host tensor copied in, every run.

The criterion tested: under that rule no tensor crosses between host and device inside a graph,
except the shape values CUDA kernels read from host memory by declaration. A crossing is
- a host tensor computed by a CPU-placed node read by a GPU node (not as a declared host input),
  or returned as a graph output (bound on the device);
- a graph input (bound on the device) read by a CPU-placed node.
The graphs are checked as exported and after onnxruntime's basic optimisations (constant
folding and the like run before partitioning). The same rule also explains why ConstantOfShape
and Expand fed by Shape are fine: their CUDA kernels read the shape from host memory and write
on the device. No Range is allowed at all: even on the GPU its kernel copies its three scalars to
the host with a blocking cudaMemcpy, a host synchronisation per run.

What this cannot see: which ops lack a CUDA kernel for a dtype (bf16 graphs), which the backend's
strict load checks on a GPU (engine/onnx_backend.py DevicePlacementError,
tests/export/test_onnx_cuda.py).
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from instructrec.engine.model import positions_of
from instructrec.engine.onnx_backend import GRAPH_FILES

# Inputs the CUDA kernels read from host memory (`InputMemoryType<OrtMemTypeCPUInput>(i)` in
# onnxruntime/core/providers/cuda/**: reshape.cc, expand.cc, generator/constant_of_shape.cc,
# unsqueeze.cc and squeeze.cc (opset 13), slice.cc (10+), split.cc (13), tile.cc, math/cumsum.cc,
# math/clip.cc (11+), reduction/reduction_ops.cc (axes inputs), math/topk.cc, pad.cc, trilu.cc).
CUDA_HOST_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "ConstantOfShape": frozenset({0}),
    "Unsqueeze": frozenset({1}), "Squeeze": frozenset({1}), "Slice": frozenset({1, 2, 3, 4}),
    "Split": frozenset({1}), "Tile": frozenset({1}), "CumSum": frozenset({1}), "Clip": frozenset({1, 2}),
    "ReduceMean": frozenset({1}), "ReduceSum": frozenset({1}), "ReduceMax": frozenset({1}),
    "TopK": frozenset({1}), "Pad": frozenset({1, 2, 3}), "Trilu": frozenset({1}),
}
CUDA_HOST_OUTPUTS: dict[str, frozenset[int]] = {"Shape": frozenset({0}), "Size": frozenset({0})}
# Op types whose CUDA registrations were read for the two tables above (every other one reads and
# writes device memory only). A graph with an op outside this set fails the test: read its
# kernel's registration and extend the tables before trusting the verdict.
REVIEWED_OPS = frozenset({
    *CUDA_HOST_INPUTS, *CUDA_HOST_OUTPUTS, "Identity", "Constant", "Gather", "GatherElements", "Concat",
    "Cast", "Where", "Not", "And", "Equal", "Greater", "Less", "LessOrEqual", "Add", "Sub", "Mul",
    "Div", "Neg", "Abs", "Log", "Sqrt", "Tanh", "Pow", "Transpose", "MatMul", "Softmax", "LogSoftmax",
    "Range",
})
SMALL_INITIALIZER = 100  # elements: onnxruntime's kSmallInitializerThreshold
HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _elements(dims) -> int:
    return int(np.prod(list(dims), dtype=np.int64))


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto.Tensor]:
    typed = onnx.shape_inference.infer_shapes(model)
    values = list(typed.graph.value_info) + list(typed.graph.input) + list(typed.graph.output)
    return {v.name: v.type.tensor_type for v in values}


def _describe(types: dict, name: str) -> str:
    t = types.get(name)
    if t is None:
        return f"{name} (type unknown)"
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return f"{name} {TensorProto.DataType.Name(t.elem_type).lower()}{dims}"


def cpu_preferred_nodes(model: onnx.ModelProto) -> set[int]:
    """Indices (in model.graph.node) of the nodes onnxruntime's CUDA provider hands to the CPU
    provider (the module docstring's rule). Constant nodes count as initializers, as onnxruntime
    turns them into initializers when it loads a graph."""
    nodes = list(model.graph.node)
    types = _value_types(model)
    initializer_size = {t.name: _elements(t.dims) for t in model.graph.initializer}
    initializer_size.update({n.output[0]: _elements(n.attribute[0].t.dims) for n in nodes
                             if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    graph_inputs = {i.name for i in model.graph.input}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    host_values: set[str] = set()
    candidates: list[int] = []  # a heap: onnx files list nodes in topological order
    for index, node in enumerate(nodes):
        for k in CUDA_HOST_OUTPUTS.get(node.op_type, ()):
            host_values.add(node.output[k])
            for consumer in consumers.get(node.output[k], []):
                heapq.heappush(candidates, consumer)
    visited: set[int] = set()
    on_cpu: set[int] = set()
    while candidates:
        index = heapq.heappop(candidates)
        if index in visited:
            continue
        visited.add(index)
        node = nodes[index]
        place = True
        for k, name in enumerate(node.input):
            if name in types and types[name].elem_type in HALF_TYPES:
                place = False
                break
            if initializer_size.get(name, SMALL_INITIALIZER + 1) <= SMALL_INITIALIZER or name in graph_inputs:
                continue
            # an omitted optional input ("") is no host tensor either: onnxruntime stops there too
            if name not in host_values or k in CUDA_HOST_INPUTS.get(node.op_type, ()):
                place = False
                break
        if place:
            on_cpu.add(index)
            for name in node.output:
                host_values.add(name)
                for consumer in consumers.get(name, []):
                    heapq.heappush(candidates, consumer)
    return on_cpu


def host_device_crossings(model: onnx.ModelProto) -> list[str]:
    """Every tensor that would cross between host and device inside the graph on the CUDA
    provider (the module docstring's definition), described with its type and shape."""
    nodes = list(model.graph.node)
    types = _value_types(model)
    on_cpu = cpu_preferred_nodes(model)
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    found = []
    for index in sorted(on_cpu):
        node = nodes[index]
        for name in node.input:
            if name in graph_inputs:
                found.append(f"device -> host: graph input {_describe(types, name)} read by "
                             f"{node.op_type} ({node.name}) on the CPU")
        for name in node.output:
            if name in graph_outputs:
                found.append(f"host -> device: graph output {_describe(types, name)} made by "
                             f"{node.op_type} ({node.name}) on the CPU")
            for consumer_index, consumer in enumerate(nodes):
                if consumer_index in on_cpu:
                    continue
                for k, used in enumerate(consumer.input):
                    if used == name and k not in CUDA_HOST_INPUTS.get(consumer.op_type, ()):
                        found.append(f"host -> device: {_describe(types, name)} made by {node.op_type} ({node.name}) "
                                     f"on the CPU, read by {consumer.op_type} ({consumer.name}) on the GPU")
    return found


def _basic_optimised(path: Path, out: Path) -> onnx.ModelProto:
    """The graph onnxruntime partitions: after its basic (level 1) optimisations."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(out), load_external_data=False)


# ------------------------------------------------------------------------------------- the graphs
@pytest.mark.parametrize("graph", sorted(GRAPH_FILES))
def test_engine_graph_keeps_every_tensor_on_the_device_under_cuda_placement(tiny_onnx, graph, tmp_path):
    out, _ = tiny_onnx
    path = out / GRAPH_FILES[graph]
    exported = onnx.load(str(path), load_external_data=False)
    unreviewed = {n.op_type for n in exported.graph.node} - REVIEWED_OPS
    assert not unreviewed, f"read the CUDA kernel registrations of {sorted(unreviewed)} and extend the tables"
    ranges = [n.name for n in exported.graph.node if n.op_type == "Range"]
    assert not ranges, f"Range nodes {ranges}: a host synchronisation per run on CUDA (see the module docstring)"
    assert host_device_crossings(exported) == []
    assert host_device_crossings(_basic_optimised(path, tmp_path / "basic.onnx")) == []


# --------------------------------------------------------------------- the rule on known patterns
def _relative_bias_graph(positions: str) -> onnx.ModelProto:
    """ids [B, L] -> T5's bucketed relative positions [L, L] -> a [L, L, 4] bias from a 32 x 4
    table, added to the embedding of the ids. positions: "range" (Shape -> Gather -> Range: what
    torch.arange(ids.shape[1]) exports to) or "cumsum" (a running count of ConstantOfShape ones
    shaped like the first row of ids: what positions_of exports to)."""
    ints = lambda name, values: numpy_helper.from_array(np.array(values, np.int64), name)  # noqa: E731
    table = numpy_helper.from_array(np.arange(128, dtype=np.float32).reshape(32, 4), "table")
    inits = [table, ints("zero", 0), ints("one", 1), ints("axis0", [0]), ints("axis1", [1]), ints("lo", 0),
             ints("hi", 31)]
    if positions == "range":
        make = [helper.make_node("Shape", ["ids"], ["shape"]),
                helper.make_node("Gather", ["shape", "one"], ["length"]),
                helper.make_node("Range", ["zero", "length", "one"], ["pos"])]
    else:
        one_value = helper.make_tensor("v", TensorProto.INT64, [1], [1])
        make = [helper.make_node("Gather", ["ids", "zero"], ["row"]),
                helper.make_node("Shape", ["row"], ["row_shape"]),
                helper.make_node("ConstantOfShape", ["row_shape"], ["ones"], value=one_value),
                helper.make_node("CumSum", ["ones", "zero"], ["count"]),
                helper.make_node("Sub", ["count", "one"], ["pos"])]
    nodes = make + [
        helper.make_node("Unsqueeze", ["pos", "axis0"], ["keys"]),
        helper.make_node("Unsqueeze", ["pos", "axis1"], ["queries"]),
        helper.make_node("Sub", ["keys", "queries"], ["rel"]),
        helper.make_node("Abs", ["rel"], ["dist"]),
        helper.make_node("Clip", ["dist", "lo", "hi"], ["bucket"]),
        helper.make_node("Gather", ["table", "bucket"], ["bias"]),  # [L, L, 4]
        helper.make_node("Gather", ["table", "ids"], ["embedded"]),  # [B, L, 4]
        helper.make_node("Add", ["bias", "embedded"], ["out"]),
    ]
    graph = helper.make_graph(nodes, positions, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "L"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_an_arange_built_bias_is_computed_on_the_cpu_and_copied_to_the_device():
    """The pattern the engine's graphs had: onnxruntime's rule sends Range and the [L, L] position
    arithmetic after it to the CPU; the table lookup stays on the GPU and reads the buckets
    through a host -> device copy."""
    model = _relative_bias_graph("range")
    placed = {model.graph.node[i].op_type for i in cpu_preferred_nodes(model)}
    assert {"Gather", "Range", "Unsqueeze", "Sub", "Abs", "Clip"} <= placed
    crossings = host_device_crossings(model)
    # shape inference cannot tell Range's length is L: the [L, L] buckets show as two unknown sizes
    assert len(crossings) == 1 and crossings[0].startswith("host -> device: bucket int64['unk")
    assert "made by Clip" in crossings[0] and "read by Gather" in crossings[0]


def test_positions_counted_from_the_data_stay_on_the_device():
    """positions_of's pattern: only Shape's own output is a host tensor, read by ConstantOfShape
    from host memory by declaration; everything after it runs on the device."""
    model = _relative_bias_graph("cumsum")
    assert cpu_preferred_nodes(model) == set()
    assert host_device_crossings(model) == []


def test_a_graph_input_read_on_the_cpu_is_a_device_to_host_copy():
    """A CPU-placed node reading an input bound on the device: reported as a copy."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "one"], ["n"]),
             helper.make_node("Mul", ["n", "scale"], ["y"])]
    graph = helper.make_graph(nodes, "input_on_cpu",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, ["B", "L"]),
                               helper.make_tensor_value_info("scale", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [])],
                              [numpy_helper.from_array(np.array(1, np.int64), "one")])
    crossings = host_device_crossings(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert any(c.startswith("device -> host: graph input scale") for c in crossings)
    assert any(c.startswith("host -> device: graph output y") for c in crossings)


# ----------------------------------------------------------------------------- the torch side
@pytest.mark.parametrize("length", [1, 2, 37, 512])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_positions_of_equals_arange(length, dtype):
    row = torch.randint(0, 32128, (length,), dtype=dtype)
    got = positions_of(row)
    assert got.dtype == torch.int64 and torch.equal(got, torch.arange(length))
