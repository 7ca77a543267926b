"""Convert an insightface recognition ONNX file (IResNet ArcFace) into the torch :class:`IResNet`.

insightface ships its ArcFace recognisers as ONNX (buffalo_l ``w600k_r50.onnx``, antelopev2
``glintr100.onnx``); the identity loss needs a differentiable torch network, so the weights are read
from the graph with the ``onnx`` package and placed into the arcface_torch layout.

The graph is read by *role*, not by initializer names: it is cut into the stem (before the first
residual ``Add``), one segment per residual block (ending in its ``Add``) and the head. Within a
block, the BatchNormalization fed by the block input is ``bn1``, the first 3x3 conv is ``conv1``, the
second ``conv2`` (its stride tells a stage's first block), a 1x1 conv is the ``downsample``; the head
is bn2 -> Flatten -> Gemm/MatMul (fc) -> BatchNormalization (features). Exporters fold a BN that
follows a conv into the conv's weight and bias; such a conv is mapped to the bias-free torch conv
plus its BN set to the identity affine with the conv's bias (exact). ``Identity`` aliases (shared
initializers) and ``Constant`` nodes are resolved.

Verified here on graphs exported by ``torch.onnx.export`` from this IResNet (BN folded, PRelu slopes
(C, 1, 1), shared initializers). insightface's released r50/r100 files follow arcface_torch's
export with the same node kinds; an input normalisation (Sub/Mul) at the graph start is detected and
reported (``report["input_normalized_in_graph"]``), since the torch IResNet expects [-1, 1] input.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .iresnet import IResNet, IResNetConfig

log = logging.getLogger(__name__)


class OnnxGraph:
    def __init__(self, path: Path):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(path))
        self.path = path
        self.values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.alias: dict[str, str] = {}
        self.nodes = []
        for n in model.graph.node:
            if n.op_type == "Identity":
                self.alias[n.output[0]] = n.input[0]
            elif n.op_type == "Constant":
                self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            else:
                self.nodes.append(n)
        self.input_name = model.graph.input[0].name

    def value(self, name: str) -> np.ndarray:
        while name in self.alias:
            name = self.alias[name]
        if name not in self.values:
            raise KeyError(f"{self.path}: tensor {name!r} is not a constant of the graph")
        return self.values[name]

    def has_value(self, name: str) -> bool:
        while name in self.alias:
            name = self.alias[name]
        return name in self.values


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


def _conv(graph: OnnxGraph, node) -> dict:
    w = graph.value(node.input[1])
    b = graph.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return {"weight": w, "bias": b, "stride": int(_attr(node, "strides", [1, 1])[0]), "out": node.output[0],
            "in": node.input[0]}


def _bn(graph: OnnxGraph, node) -> dict:
    return {"weight": graph.value(node.input[1]), "bias": graph.value(node.input[2]),
            "running_mean": graph.value(node.input[3]), "running_var": graph.value(node.input[4]),
            "eps": float(_attr(node, "epsilon", 1e-5)), "in": node.input[0], "out": node.output[0]}


def _identity_bn(bias: np.ndarray, eps: float = 1e-5) -> dict:
    c = bias.shape[0]
    return {"weight": np.ones(c, np.float32), "bias": bias.astype(np.float32), "running_mean": np.zeros(c, np.float32),
            "running_var": np.full(c, 1.0 - eps, np.float32), "eps": eps}


def _conv_and_bn(graph, conv_node, bns_by_input) -> tuple[dict, dict]:
    conv = _conv(graph, conv_node)
    bn = bns_by_input.pop(conv["out"], None)
    if bn is None:
        bias = conv["bias"] if conv["bias"] is not None else np.zeros(conv["weight"].shape[0], np.float32)
        bn = _identity_bn(bias)
    elif conv["bias"] is not None:  # conv bias + BN: fold the bias into the BN's mean
        bn = {**bn, "running_mean": bn["running_mean"] - conv["bias"]}
    return conv, bn


def onnx_to_iresnet(path: str | Path) -> tuple[IResNet, dict]:
    """Build an :class:`IResNet` with the ONNX file's weights; returns (model in eval mode, report)."""
    path = Path(path)
    graph = OnnxGraph(path)
    ops = [n.op_type for n in graph.nodes]
    if "Add" not in ops or "Conv" not in ops:
        raise ValueError(f"{path}: no residual Conv/Add structure; not an IResNet recognition model")
    normalized = any(op in ("Sub", "Mul", "Div") for op in ops[:4])
    adds = [i for i, n in enumerate(graph.nodes) if n.op_type == "Add" and not graph.has_value(n.input[1])]
    segments = [graph.nodes[: adds[0] + 1]]
    segments += [graph.nodes[a + 1: b + 1] for a, b in zip(adds, adds[1:])]
    tail = graph.nodes[adds[-1] + 1:]
    state: dict[str, np.ndarray] = {}

    def put_conv(prefix, conv):
        state[f"{prefix}.weight"] = conv["weight"]

    def put_bn(prefix, bn):
        for k in ("weight", "bias", "running_mean", "running_var"):
            state[f"{prefix}.{k}"] = bn[k]

    def put_prelu(prefix, node):
        state[f"{prefix}.weight"] = graph.value(node.input[1]).reshape(-1)

    # stem: the first Conv (+BN) and PRelu of the first segment, before the first block's bn1
    first = segments[0]
    stem_conv = next(n for n in first if n.op_type == "Conv")
    stem_prelu = next(n for n in first if n.op_type == "PRelu")
    bns = {n.input[0]: _bn(graph, n) for n in first if n.op_type == "BatchNormalization"}
    conv, bn = _conv_and_bn(graph, stem_conv, bns)
    put_conv("conv1", conv)
    put_bn("bn1", bn)
    put_prelu("prelu", stem_prelu)
    segments[0] = first[first.index(stem_prelu) + 1:]

    layers, widths, stage, block = [], [], 0, 0
    for seg in segments:
        convs = [n for n in seg if n.op_type == "Conv"]
        bns = {n.input[0]: _bn(graph, n) for n in seg if n.op_type == "BatchNormalization"}
        three = [n for n in convs if graph.value(n.input[1]).shape[-1] == 3]
        ones = [n for n in convs if graph.value(n.input[1]).shape[-1] == 1]
        prelu = next(n for n in seg if n.op_type == "PRelu")
        if len(three) != 2 or len(ones) > 1:
            raise ValueError(f"{path}: a residual block with {len(three)} 3x3 and {len(ones)} 1x1 convs; "
                             "not an IResNet block")
        if ones:  # a downsampling block starts a new stage
            stage, block = stage + 1, 0
            layers.append(0)
            widths.append(int(graph.value(three[0].input[1]).shape[0]))
        name = f"layer{stage}.{block}"
        c1, b2 = _conv_and_bn(graph, three[0], bns)
        c2, b3 = _conv_and_bn(graph, three[1], bns)
        put_conv(f"{name}.conv1", c1)
        put_bn(f"{name}.bn2", b2)
        put_conv(f"{name}.conv2", c2)
        put_bn(f"{name}.bn3", b3)
        put_prelu(f"{name}.prelu", prelu)
        if ones:
            cd, bd = _conv_and_bn(graph, ones[0], bns)
            put_conv(f"{name}.downsample.0", cd)
            put_bn(f"{name}.downsample.1", bd)
        if len(bns) != 1:
            raise ValueError(f"{path}: block {name} has {len(bns)} unassigned BatchNormalization nodes")
        put_bn(f"{name}.bn1", next(iter(bns.values())))
        layers[-1] += 1
        block += 1
    tail_bns = [_bn(graph, n) for n in tail if n.op_type == "BatchNormalization"]
    fc = next((n for n in tail if n.op_type in ("Gemm", "MatMul")), None)
    if fc is None or len(tail_bns) != 2 or len(layers) != 4:
        raise ValueError(f"{path}: expected 4 stages and a bn2 -> fc -> features head, found {len(layers)} stages")
    w = graph.value(fc.input[1])
    if fc.op_type == "MatMul" or not _attr(fc, "transB", 0):
        w = w.T
    state["fc.weight"] = w
    if fc.op_type == "Gemm" and len(fc.input) > 2:
        state["fc.bias"] = graph.value(fc.input[2])
    else:
        bias_add = next((n for n in tail if n.op_type == "Add" and graph.has_value(n.input[1])), None)
        state["fc.bias"] = graph.value(bias_add.input[1]) if bias_add is not None else np.zeros(w.shape[0], np.float32)
    put_bn("bn2", tail_bns[0])
    put_bn("features", tail_bns[1])
    side = int(round((w.shape[1] / widths[-1]) ** 0.5))
    cfg = IResNetConfig(layers=tuple(layers), widths=tuple(widths), embedding_size=int(w.shape[0]), input_size=side * 16)
    model = IResNet(cfg)
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing = expected - set(state)
    if missing:
        raise ValueError(f"{path}: could not find weights for {sorted(missing)[:5]}")
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=False)
    model.eval()
    eps = {bn["eps"] for bn in tail_bns}
    report = {"arch": {"layers": list(layers), "widths": list(widths), "embedding_size": cfg.embedding_size},
              "input_normalized_in_graph": normalized, "bn_eps": sorted(eps), "source": str(path)}
    log.info("converted %s: %s", path, report["arch"])
    return model, report


def convert(onnx_path: str | Path, out_folder: str | Path) -> Path:
    """Convert an ONNX recogniser into an idforge face-encoder folder (config.json + safetensors)."""
    from .face_encoder import FaceEncoder

    model, _ = onnx_to_iresnet(onnx_path)
    return FaceEncoder(model).save_pretrained(out_folder)
