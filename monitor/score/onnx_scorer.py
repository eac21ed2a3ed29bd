"""The onnxruntime backend: scores a bundle's layers with its exported ONNX graphs.

Same contract as :class:`monitor.score.scorer.Scorer` (``layers``, ``d_model``,
``detectors_on``, ``score``, ``score_components``) on numpy arrays, and never imports
torch: the bundle is loaded with ``load_tensors=False`` and the numbers come from the
graphs (see ``onnx_export.py`` for the graph and why float32 input serves every wire dtype:
float16 rows are upcast here with ``astype``, exact; bfloat16 arrives as float32 from the
codec).

Load-time checks, each refusal a :class:`BundleError` naming field, expected and found:
the graph bytes' sha256 against the manifest (re-read: the file may have changed since
``load_bundle``), opset, operators (only ``onnx_export.OPS``), input ``x`` float32
``[n_rows, d_model]``, outputs ``scores [n_rows, n_detectors]`` and ``z [n_rows, n_cols]``,
metadata (format, layer, d_model, detector names and order, source digest), finite
initializers (θ may be −inf: identity columns), and ``onnx.checker``.

Thread rules: immutable after construction; onnxruntime's ``InferenceSession.run`` is
thread-safe, so ``score`` may run on any thread. ``threads`` sets each session's intra-op
thread count (0: onnxruntime's default, one per physical core).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from monitor.wire.hooks import parse_hook_name

from .bundle import Bundle, BundleError

__all__ = ["OnnxScorer"]

#: ``metadata_props["format"]`` of an exported graph.
GRAPH_FORMAT = "safety-monitor-onnx"
#: Operators an exported graph may contain (onnx_export builds from these only).
OPS = frozenset({"Gemm", "ReduceMean", "Sub", "Mul", "Add", "Sqrt", "Div", "Where",
                 "Greater", "Cast", "Max", "Sigmoid"})
#: Initializers that may hold −inf (identity columns: θ = −inf, floor = −inf).
_NEG_INF_OK = frozenset({"theta", "floor"})
_INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass(frozen=True, eq=False)
class _Layer:
    """One layer's session and its output sizes."""

    session: Any  # onnxruntime.InferenceSession (untyped package)
    detectors: tuple[str, ...]
    n_cols: int


class OnnxScorer:
    """Scores activation rows with onnxruntime (CPU), one session per layer."""

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        src = f"{bundle.path}/manifest.json"
        if bundle.onnx is None:
            raise BundleError(src, "onnx", "ONNX graphs for the onnxruntime backend (run "
                              f"`safety-monitor export-onnx --bundle {bundle.path}`)",
                              "no onnx section")
        self.bundle = bundle
        self.d_model = bundle.d_model
        self.layers: tuple[int, ...] = bundle.layers
        self.hooks: tuple[str, ...] = bundle.hook_names
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(threads, 0)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._layers = {layer: self._load(layer, opts, src) for layer in self.layers}

    def _load(self, layer: int, opts: Any, src: str) -> _Layer:
        assert self.bundle.onnx is not None
        path = self.bundle.onnx.files[layer]
        where = f"files[{path.name!r}]"
        data = path.read_bytes()
        want = self.bundle.manifest["files"][path.name]
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise BundleError(src, where, f"sha256 {want}", f"sha256 {got}")

        def fail(field: str, expected: str, found: object) -> BundleError:
            return BundleError(src, f"{where}: {field}", expected, str(found))

        try:
            model = onnx.load_model_from_string(data)
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # protobuf / checker errors
            raise fail("model", "a valid ONNX model", f"{type(e).__name__}: {e}") from None
        opsets = {o.domain: o.version for o in model.opset_import}
        if opsets != {"": self.bundle.onnx.opset}:
            raise fail("opset_import", f"{{'': {self.bundle.onnx.opset}}}", opsets)
        g = model.graph
        ops = {n.op_type for n in g.node}
        if not ops <= OPS or any(n.domain for n in g.node):
            raise fail("graph.node", f"operators from {sorted(OPS)}", sorted(ops - OPS))
        meta = {p.key: p.value for p in model.metadata_props}
        dets = tuple(d.name for d in self.bundle.detectors_on(layer))
        n_cols = sum(c.k for c in self.bundle.components_on(layer))
        expected_meta = {
            "format": GRAPH_FORMAT, "bundle": self.bundle.name, "layer": str(layer),
            "d_model": str(self.d_model), "detectors": json.dumps(list(dets)),
            "source_sha256": self.bundle.onnx.source_sha256,
        }
        for key, value in expected_meta.items():
            if meta.get(key) != value:
                raise fail(f"metadata_props[{key!r}]", repr(value), repr(meta.get(key)))
        _check_io(g.input, [("x", self.d_model)], "graph.input", fail)
        _check_io(g.output, [("scores", len(dets)), ("z", n_cols)], "graph.output", fail)
        init_names = {t.name for t in g.initializer}
        if any(i.name in init_names for i in g.input):
            raise fail("graph.input", "no input that overrides an initializer", "one")
        for t in g.initializer:
            a = numpy_helper.to_array(t)
            if a.dtype.kind != "f":
                continue
            ok = np.isfinite(a)
            if t.name in _NEG_INF_OK:
                ok |= np.isneginf(a)
            if not bool(ok.all()):
                raise fail(f"initializer {t.name!r}", "finite values"
                           + (" (or -inf)" if t.name in _NEG_INF_OK else ""),
                           f"{int(a.size - np.count_nonzero(ok))} non-finite values")
        session = ort.InferenceSession(data, sess_options=opts,
                                       providers=["CPUExecutionProvider"])
        return _Layer(session=session, detectors=dets, n_cols=n_cols)

    # ----------------------------------------------------------------------- public

    def detectors_on(self, layer: int | str) -> tuple[str, ...]:
        """Detector names of ``layer``, in the column order of :meth:`score`."""
        return self._layer(layer).detectors

    def score_components(self, layer: int | str, x: np.ndarray) -> np.ndarray:
        """Column values ``Z`` after the epilogue: float32 ``[n_rows, n_cols]``."""
        return self._run(layer, x, "z")

    def score(self, layer: int | str, x: np.ndarray) -> np.ndarray:
        """Detector scores in [0, 1]: float32 ``[n_rows, len(detectors_on(layer))]``.

        ``x``: ``[n_rows, d_model]`` float32 / float16 numpy array (not modified; float16
        is upcast, exact). ``n_rows`` may be 0.
        """
        return self._run(layer, x, "scores")

    def score_and_columns(self, layer: int | str, x: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """``(score(layer, x), score_components(layer, x))`` from one session run."""
        scores, z = self._run_many(layer, x, ("scores", "z"))
        return scores, z

    # ----------------------------------------------------------------------- helpers

    def _run(self, layer: int | str, x: np.ndarray, output: str) -> np.ndarray:
        return self._run_many(layer, x, (output,))[0]

    def _run_many(self, layer: int | str, x: np.ndarray, outputs: tuple[str, ...]
                  ) -> list[np.ndarray]:
        lay = self._layer(layer)
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
        if x.dtype not in _INPUT_DTYPES:
            raise ValueError(f"x dtype must be one of {[str(d) for d in _INPUT_DTYPES]}, "
                             f"got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape [n_rows, {self.d_model}], "
                             f"got {list(x.shape)}")
        if x.shape[0] == 0:
            return [np.zeros((0, len(lay.detectors) if o == "scores" else lay.n_cols),
                             dtype=np.float32) for o in outputs]
        xf = np.ascontiguousarray(x, dtype=np.float32)
        outs = lay.session.run(list(outputs), {"x": xf})
        return [np.asarray(o, dtype=np.float32) for o in outs]

    def _layer(self, point: int | str) -> _Layer:
        layer = point if isinstance(point, int) else _resid_post_layer(point)
        try:
            return self._layers[layer]
        except KeyError:
            raise KeyError(f"layer {layer} has no detectors in bundle "
                           f"{self.bundle.name!r} (layers {list(self.layers)})") from None


def _check_io(values: Any, want: list[tuple[str, int]], field: str, fail: Any) -> None:
    """Each value: the expected name, float32, shape [dynamic n_rows, width]."""
    found = [v.name for v in values]
    if found != [n for n, _ in want]:
        raise fail(field, f"names {[n for n, _ in want]}", found)
    for v, (name, width) in zip(values, want, strict=True):
        tt = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
        if tt.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 \
                or not isinstance(dims[0], str) or dims[1] != width:
            raise fail(f"{field}[{name!r}]", f"float32 [n_rows, {width}]",
                       f"elem_type {tt.elem_type} shape {dims}")


def _resid_post_layer(name: str) -> int:
    """The layer of ``blocks.L.hook_resid_post`` (-1 for another hook: not scored here;
    a bundle with one has no onnx section)."""
    hp = parse_hook_name(name)
    return hp.layer if hp.kind == "resid_post" else -1
