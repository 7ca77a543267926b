"""Convert an insightface recognition ONNX file (IResNet ArcFace) into the torch :class:`IResNet`.

insightface ships its ArcFace recognisers as ONNX (buffalo_l ``w600k_r50.onnx``, antelopev2
``glintr100.onnx``); the identity loss needs a differentiable torch network, so the weights are read
from the graph with the ``onnx`` package and placed into the arcface_torch layout.

The graph is read by *role and data flow*, never by initializer names (which exporters renumber):
it is cut at the residual ``Add`` nodes (both inputs computed) into the stem, one segment per block
and the head. In a block with input x: ``bn1`` is the BatchNormalization reading x, ``conv2`` the
3x3 Conv reading the PRelu output, ``conv1`` the other 3x3 Conv, and a 1x1 Conv reading x is the
``downsample`` (it starts a new stage; its stride-2 sibling ``conv2`` confirms it). The head is
bn2 -> Flatten -> Gemm/MatMul(+Add) (fc) -> BatchNormalization (features). Exporters fold a BN that
follows a conv into the conv's weight and bias: such a conv is mapped to the bias-free torch conv
plus its BN set to the identity affine carrying the conv's bias (exact: var = 1 - eps); a conv with a
bias *and* a BN gets the bias folded into the BN's mean. ``Identity`` nodes (aliases, eval-mode
dropout) and ``Constant`` nodes are resolved. A ``features`` BN folded into the fc becomes an
identity BN.

What has been verified (tests/models/face/test_onnx_convert.py): graphs produced here by
``torch.onnx.export(..., dynamo=False)`` from this IResNet (the TorchScript exporter; the dynamo
exporter needs ``onnxscript``, not installed): BN folded into convs, PRelu slopes (C, 1, 1),
``Flatten`` + ``Gemm`` head, dynamic batch axis; the converted torch model matches onnxruntime to
< 1e-4 max abs error for a tiny net and an r18-depth net, and insightface's own loader accepts the
same files.

What is expected, not verified offline (no released weights here): insightface's w600k_r50 and
glintr100 come from arcface_torch's ``torch2onnx.py`` (the same TorchScript export, eval mode,
constant folding), i.e. the node sequence above; [-1, 1] input normalisation happens outside the
graph (insightface uses input_mean = input_std = 127.5). Older mxnet-converted recognisers put
``Sub``/``Mul`` (``_minus``/``_mulscalar``) nodes first and take raw 0..255 input; those constants
are read and reported in ``report["input_normalization"]``: if they are (127.5, 1/127.5) the
converted torch model, which expects [-1, 1], computes the same function; otherwise a warning is
logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .iresnet import IResNet, IResNetConfig, load_arcface_state_dict

log = logging.getLogger(__name__)


class OnnxGraph:
    """The graph's compute nodes with ``Identity`` aliases and ``Constant`` values resolved."""

    def __init__(self, path: Path):
        import onnx
        from onnx import numpy_helper

        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable ONNX file ({e})") from e
        self.path = path
        self.values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.alias: dict[str, str] = {}
        self.nodes = []
        for n in model.graph.node:
            if n.op_type == "Identity" or (n.op_type == "Dropout" and len(n.output) >= 1):
                self.alias[n.output[0]] = n.input[0]
            elif n.op_type == "Constant":
                self.values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            else:
                self.nodes.append(n)
        inputs = [i for i in model.graph.input if i.name not in self.values]
        self.input_name = inputs[0].name if inputs else None

    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def value(self, name: str) -> np.ndarray:
        name = self.resolve(name)
        if name not in self.values:
            raise KeyError(f"{self.path}: tensor {name!r} is not a constant of the graph")
        return self.values[name]

    def has_value(self, name: str) -> bool:
        return self.resolve(name) in self.values

    def data_input(self, node) -> str:
        return self.resolve(node.input[0])


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _bn(graph: OnnxGraph, node) -> dict:
    return {
        "weight": graph.value(node.input[1]),
        "bias": graph.value(node.input[2]),
        "running_mean": graph.value(node.input[3]),
        "running_var": graph.value(node.input[4]),
        "eps": float(_attr(node, "epsilon", 1e-5)),
    }


def _identity_bn(bias: np.ndarray, eps: float = 1e-5) -> dict:
    """BN parameters computing y = x + bias exactly (torch's IResNet BNs use eps = 1e-5)."""
    c = bias.shape[0]
    return {
        "weight": np.ones(c, np.float32),
        "bias": np.asarray(bias, np.float32),
        "running_mean": np.zeros(c, np.float32),
        "running_var": np.full(c, 1.0 - eps, np.float32),
        "eps": eps,
    }


class _Builder:
    """Collects the arcface_torch state dict while walking the graph."""

    def __init__(self, graph: OnnxGraph):
        self.graph = graph
        self.state: dict[str, np.ndarray] = {}
        self.eps: set[float] = set()

    def conv_bn(self, conv, bns: dict, conv_key: str, bn_key: str) -> None:
        """Conv ``conv`` and the BN that reads its output (or the folded bias) into the two keys."""
        g = self.graph
        w = g.value(conv.input[1])
        bias = g.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        bn = bns.pop(conv.output[0], None)
        if bn is None:
            bn = _identity_bn(bias if bias is not None else np.zeros(w.shape[0], np.float32))
        elif bias is not None:  # conv bias followed by a BN: BN(x + b) has mean shifted by -b
            bn = {**bn, "running_mean": bn["running_mean"] - bias}
        self.state[f"{conv_key}.weight"] = w
        self.bn(bn_key, bn)

    def bn(self, key: str, bn: dict) -> None:
        self.eps.add(bn["eps"])
        if abs(bn["eps"] - 1e-5) > 1e-9:  # torch's BN uses eps 1e-5: move the difference into the variance
            bn = {**bn, "running_var": bn["running_var"] + bn["eps"] - 1e-5}
        for k in ("weight", "bias", "running_mean", "running_var"):
            self.state[f"{key}.{k}"] = bn[k]

    def prelu(self, key: str, node) -> None:
        self.state[f"{key}.weight"] = self.graph.value(node.input[1]).reshape(-1)  # (C, 1, 1) -> (C,)


def _bns_by_input(graph: OnnxGraph, nodes) -> dict:
    return {graph.data_input(n): _bn(graph, n) for n in nodes if n.op_type == "BatchNormalization"}


def _input_normalization(graph: OnnxGraph, nodes) -> dict | None:
    """Sub/Mul/Div/Add-by-constant nodes before the first Conv: (x - mean) * scale inside the graph."""
    mean, scale, found = 0.0, 1.0, False
    for n in nodes:
        if n.op_type == "Conv":
            break
        if n.op_type in ("Sub", "Add", "Mul", "Div") and len(n.input) == 2 and graph.has_value(n.input[1]):
            c = float(np.asarray(graph.value(n.input[1])).reshape(-1).mean())
            found = True
            if n.op_type == "Sub":
                mean += c / scale
            elif n.op_type == "Add":
                mean -= c / scale
            elif n.op_type == "Mul":
                scale *= c
            else:
                scale /= c
    return {"mean": mean, "scale": scale} if found else None


def onnx_to_iresnet(path: str | Path) -> tuple[IResNet, dict]:
    """Build an :class:`IResNet` with the ONNX file's weights; returns (model in eval mode, report)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX recogniser not found")
    g = OnnxGraph(path)
    ops = [n.op_type for n in g.nodes]
    adds = [
        i
        for i, n in enumerate(g.nodes)
        if n.op_type == "Add" and len(n.input) == 2 and not any(g.has_value(x) for x in n.input)
    ]
    if not adds or "Conv" not in ops or "PRelu" not in ops:
        raise ValueError(
            f"{path}: no residual Conv/PRelu/Add structure; not an IResNet recognition model "
            "(expected e.g. buffalo_l w600k_r50.onnx or antelopev2 glintr100.onnx)"
        )
    segments = [g.nodes[a + 1 : b + 1] for a, b in zip([-1] + adds[:-1], adds)]
    tail = g.nodes[adds[-1] + 1 :]
    b = _Builder(g)

    # stem: Conv (+BN) -> PRelu, then the first block starts at the PRelu output
    first = segments[0]
    normalization = _input_normalization(g, first)
    stem_conv = next(n for n in first if n.op_type == "Conv")
    stem_prelu = next(n for n in first if n.op_type == "PRelu")
    b.conv_bn(stem_conv, _bns_by_input(g, first), "conv1", "bn1")
    b.prelu("prelu", stem_prelu)
    segments[0] = first[first.index(stem_prelu) + 1 :]
    block_input = stem_prelu.output[0]

    layers: list[int] = []
    widths: list[int] = []
    for seg in segments:
        bns = _bns_by_input(g, seg)
        convs = [n for n in seg if n.op_type == "Conv"]
        prelus = [n for n in seg if n.op_type == "PRelu"]
        three = [n for n in convs if g.value(n.input[1]).shape[-1] == 3]
        ones = [n for n in convs if g.value(n.input[1]).shape[-1] == 1]
        if len(three) != 2 or len(ones) > 1 or len(prelus) != 1 or block_input not in bns:
            raise ValueError(
                f"{path}: residual block after {block_input!r} has {len(three)} 3x3 convs, {len(ones)} "
                f"1x1 convs, {len(prelus)} PRelu and {'a' if block_input in bns else 'no'} input BN; "
                "not an IResNet block (bn1-conv1-bn2-prelu-conv2-bn3 + 1x1 downsample)"
            )
        conv2 = next((n for n in three if g.data_input(n) == prelus[0].output[0]), three[1])
        conv1 = three[0] if conv2 is three[1] else three[1]
        if ones:  # a downsampling block starts a new stage
            layers.append(0)
            widths.append(int(g.value(conv1.input[1]).shape[0]))
        if not layers:
            raise ValueError(f"{path}: the first residual block has no 1x1 downsample; not an IResNet")
        name = f"layer{len(layers)}.{layers[-1]}"
        b.bn(f"{name}.bn1", bns.pop(block_input))
        b.conv_bn(conv1, bns, f"{name}.conv1", f"{name}.bn2")
        b.prelu(f"{name}.prelu", prelus[0])
        b.conv_bn(conv2, bns, f"{name}.conv2", f"{name}.bn3")
        if ones:
            b.conv_bn(ones[0], bns, f"{name}.downsample.0", f"{name}.downsample.1")
        if bns:
            raise ValueError(
                f"{path}: block {name} has {len(bns)} BatchNormalization nodes with no IResNet role"
            )
        layers[-1] += 1
        block_input = seg[-1].output[0]

    fc = next((n for n in tail if n.op_type in ("Gemm", "MatMul")), None)
    if fc is None or len(layers) != 4:
        raise ValueError(
            f"{path}: expected 4 stages and a bn2 -> fc -> features head, found {len(layers)} stages "
            f"and {'an' if fc else 'no'} fc"
        )
    w = g.value(fc.input[1])
    if fc.op_type == "MatMul" or not _attr(fc, "transB", 0):
        w = w.T  # (in, out) -> (out, in)
    b.state["fc.weight"] = w
    fc_out = fc.output[0]
    if fc.op_type == "Gemm" and len(fc.input) > 2 and fc.input[2]:
        b.state["fc.bias"] = g.value(fc.input[2])
    else:
        bias_add = next(
            (n for n in tail if n.op_type == "Add" and g.data_input(n) == fc_out and g.has_value(n.input[1])),
            None,
        )
        b.state["fc.bias"] = (
            g.value(bias_add.input[1]) if bias_add is not None else np.zeros(w.shape[0], np.float32)
        )
        fc_out = bias_add.output[0] if bias_add is not None else fc_out
    head = _bns_by_input(g, tail)
    features = head.pop(fc_out, None)
    if len(head) != 1:
        raise ValueError(f"{path}: expected one BatchNormalization (bn2) before the fc, found {len(head)}")
    b.bn("bn2", next(iter(head.values())))
    b.bn("features", features if features is not None else _identity_bn(np.zeros(w.shape[0], np.float32)))

    side = round((w.shape[1] / widths[-1]) ** 0.5)
    cfg = IResNetConfig(
        layers=tuple(layers), widths=tuple(widths), embedding_size=int(w.shape[0]), input_size=side * 16
    )
    model = IResNet(cfg)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in b.state.items()}
    load_arcface_state_dict(model, tensors, str(path))
    model.eval()
    if normalization and not (
        abs(normalization["mean"] - 127.5) < 1e-3 and abs(normalization["scale"] * 127.5 - 1) < 1e-3
    ):
        log.warning(
            "%s: the graph normalises its input as (x - %.4g) * %.4g, not (x - 127.5) / 127.5; the torch "
            "model expects what that normalisation produces",
            path,
            normalization["mean"],
            normalization["scale"],
        )
    report = {
        "arch": {
            "layers": list(layers),
            "widths": list(widths),
            "embedding_size": cfg.embedding_size,
            "input_size": cfg.input_size,
        },
        "input_normalized_in_graph": normalization is not None,
        "input_normalization": normalization,
        "features_bn_in_graph": features is not None,
        "bn_eps": sorted(b.eps),
        "source": str(path),
    }
    log.info("converted %s: %s", path, report["arch"])
    return model, report
