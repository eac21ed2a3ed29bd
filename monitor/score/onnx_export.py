"""Export each packed layer of a bundle as an ONNX graph, written beside the bundle.

One graph per detector layer, built with the ``onnx`` helper API (no torch.onnx: the
graph is ten nodes whose weights are exactly ``PackedLayer``'s, so tracing would only add
a dependency). Input ``x`` float32 ``[n_rows, d_model]`` (``n_rows`` dynamic)::

    P  = Gemm(x, Wt, b_gemm, transB=1)          [n_rows, n_cols]   Wt = Wᵀ, as Scorer keeps it
    -- only if the layer has layer_norm columns (``ln``):
    v  = ReduceMean((x − ReduceMean(x))², axis 1)                  [n_rows, 1]
    sd = Sqrt(v + ln_eps)                       layer_norm_std columns: Sqrt(v·d/(d−1)) + ln_eps
    P  = Where(ln, P / sd, P) + b_post                             b_post: b on ln columns
    --
    Z  = P · Cast(P > θ)                        [n_rows, n_cols]   output "z"
      (a layer with gated columns: Z = Where(P > θ, Max(s·P + t, floor), 0))
    S  = Sigmoid(Gemm(Z, R, c))                 [n_rows, n_det]    output "scores"

which is ``Scorer``'s fp32 path operation for operation (pack.py derives W, b, θ, R, c).
float16 / bfloat16 activations are upcast to float32 before the graph (exact: every fp16
and bf16 value is a float32 value; the wire codec turns bf16 into fp32 by a 16-bit
shift), so one float32 graph serves all three wire dtypes.

The graph carries metadata (``metadata_props``): ``format`` = ``safety-monitor-onnx``,
``bundle``, ``layer``, ``d_model``, ``detectors`` (JSON list, read-out order),
``source_sha256`` (:func:`bundle.source_digest` of the manifest it came from). The
manifest gains ``onnx`` = ``{opset, input_dtype, source_sha256, layers: {layer: file}}``
and every graph's sha256 in ``files``; ``load_bundle`` and ``OnnxScorer`` check all of it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .bundle import MANIFEST, Bundle, BundleError, _sha256_file, load_bundle, source_digest
from .onnx_scorer import GRAPH_FORMAT
from .pack import PackedLayer, pack_layer

__all__ = ["GRAPH_FORMAT", "OPSET", "build_layer_graph", "export_onnx", "onnx_file_name"]

OPSET = 17  # bundle.ONNX_OPSETS lists what loaders accept


def onnx_file_name(layer: int) -> str:
    """The graph file of ``layer`` inside the bundle directory."""
    return f"layer{layer}.onnx"


def _init(name: str, a: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def build_layer_graph(p: PackedLayer, *, bundle_name: str, source_sha256: str
                      ) -> onnx.ModelProto:
    """The ONNX model of one packed layer (see the module docstring for the graph)."""
    W = p.W.numpy().astype(np.float32)
    b = p.b.numpy().astype(np.float32)
    n = p.n_cols
    inits = [
        _init("Wt", W.T),
        _init("theta", p.theta.numpy().astype(np.float32)),
        _init("R", p.R.numpy().astype(np.float32)),
        _init("c", p.c.numpy().astype(np.float32)),
    ]
    nodes = []
    if p.ln_cols is None:
        inits.append(_init("b_gemm", b))
        nodes.append(helper.make_node("Gemm", ["x", "Wt", "b_gemm"], ["P"], transB=1))
    else:
        assert p.ln_eps is not None
        ln = p.ln_cols.numpy()
        inits += [
            _init("b_gemm", np.where(ln, 0.0, b).astype(np.float32)),
            _init("b_post", np.where(ln, b, 0.0).astype(np.float32)),
            _init("ln_cols", ln.astype(np.bool_)),
            _init("ln_eps", p.ln_eps.numpy().astype(np.float32).reshape(1, n)),
        ]
        nodes += [
            helper.make_node("Gemm", ["x", "Wt", "b_gemm"], ["P0"], transB=1),
            helper.make_node("ReduceMean", ["x"], ["mu"], axes=[1], keepdims=1),
            helper.make_node("Sub", ["x", "mu"], ["xc"]),
            helper.make_node("Mul", ["xc", "xc"], ["xc2"]),
            helper.make_node("ReduceMean", ["xc2"], ["var"], axes=[1], keepdims=1),
            helper.make_node("Add", ["var", "ln_eps"], ["var_eps"]),  # [n_rows, n_cols]
            helper.make_node("Sqrt", ["var_eps"], ["sd" if p.ln_std is None else "sd_ln"]),
        ]
        if p.ln_std is not None:  # (x − μ) / (unbiased std + ε) on these columns
            d = p.d_model
            inits += [_init("ln_std", p.ln_std.numpy().astype(np.bool_)),
                      _init("bessel", np.array(d / max(d - 1, 1), dtype=np.float32))]
            nodes += [
                helper.make_node("Mul", ["var", "bessel"], ["var_u"]),
                helper.make_node("Sqrt", ["var_u"], ["std_u"]),
                helper.make_node("Add", ["std_u", "ln_eps"], ["sd_std"]),
                helper.make_node("Where", ["ln_std", "sd_std", "sd_ln"], ["sd"]),
            ]
        nodes += [
            helper.make_node("Div", ["P0", "sd"], ["P_ln"]),
            helper.make_node("Where", ["ln_cols", "P_ln", "P0"], ["P1"]),
            helper.make_node("Add", ["P1", "b_post"], ["P"]),
        ]
    nodes.append(helper.make_node("Greater", ["P", "theta"], ["on"]))
    if p.mag_scale is None:
        nodes += [helper.make_node("Cast", ["on"], ["on_f"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["P", "on_f"], ["z"])]
    else:  # the general epilogue (gated columns): [P > θ] · max(s·P + t, floor)
        assert p.mag_shift is not None and p.floor is not None
        inits += [_init("mag_scale", p.mag_scale.numpy().astype(np.float32)),
                  _init("mag_shift", p.mag_shift.numpy().astype(np.float32)),
                  _init("floor", p.floor.numpy().astype(np.float32)),
                  _init("zero", np.array(0.0, dtype=np.float32))]
        nodes += [helper.make_node("Mul", ["P", "mag_scale"], ["sP"]),
                  helper.make_node("Add", ["sP", "mag_shift"], ["mag0"]),
                  helper.make_node("Max", ["mag0", "floor"], ["mag"]),
                  helper.make_node("Where", ["on", "mag", "zero"], ["z"])]
    nodes += [
        helper.make_node("Gemm", ["z", "R", "c"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
    ]
    d_out = len(p.detectors)
    graph = helper.make_graph(
        nodes, f"{bundle_name}.layer{p.layer}",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n_rows", p.d_model])],
        outputs=[helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n_rows", d_out]),
                 helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n_rows", n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="vllm-safety-monitor")
    model.ir_version = 8  # opset 17's IR version: loadable by onnxruntime >= 1.13
    helper.set_model_props(model, {
        "format": GRAPH_FORMAT, "bundle": bundle_name, "layer": str(p.layer),
        "d_model": str(p.d_model), "detectors": json.dumps(list(p.detectors)),
        "source_sha256": source_sha256,
    })
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(path: str | os.PathLike[str]) -> Bundle:
    """Write one graph per detector layer into bundle ``path`` and pin them in its manifest.

    Loads (validates) the bundle with its tensors, packs every layer, writes
    ``layer<L>.onnx`` files, then rewrites manifest.json with the ``onnx`` section and the
    graphs' sha256 in ``files`` (graphs of an earlier export are replaced; their files are
    removed). Returns the bundle as reloaded, and so validated, by ``load_bundle``.
    """
    root = Path(path)
    bundle = load_bundle(root)
    full = [c.name for c in bundle.components.values() if c.activation == "topk"]
    if full:
        raise BundleError(str(root / MANIFEST), "components[].activation",
                          "no topk components (their full-width block has no ONNX graph; "
                          "use the torch backend)", f"topk in {full}")
    if not bundle.resid_post_only:
        raise BundleError(str(root / MANIFEST), "detectors[].hook_name",
                          "resid_post hook points only (an ONNX graph is keyed by layer)",
                          f"{list(bundle.hook_names)}")
    doc: dict[str, Any] = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    old = [f for f in doc.get("files", {}) if f.endswith(".onnx")]
    src = source_digest(doc)
    layers: dict[str, str] = {}
    files = {f: d for f, d in doc["files"].items() if not f.endswith(".onnx")}
    for layer in bundle.layers:
        model = build_layer_graph(pack_layer(bundle, layer), bundle_name=bundle.name,
                                  source_sha256=src)
        fname = onnx_file_name(layer)
        tmp = root / f".{fname}.tmp"
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, root / fname)
        layers[str(layer)] = fname
        files[fname] = _sha256_file(root / fname)
    doc["files"] = files
    doc["onnx"] = {"opset": OPSET, "input_dtype": "float32", "source_sha256": src,
                   "layers": layers}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    for f in old:
        if f not in files:
            (root / f).unlink(missing_ok=True)
    return load_bundle(root)
