"""Detector bundles: load, validate and write (format_version 1, see docs/BUNDLE.md).

A bundle is a directory holding ``manifest.json`` (everything but the numbers) and one or
more ``.safetensors`` files (the numbers). :func:`load_bundle` validates every field and
refuses with a :class:`BundleError` that names the field, what was expected and what was
found::

    bundles/x/manifest.json: components[1].layer: expected an integer in [0, 30), found 31

Nothing is ever unpickled: tensors are read with ``safetensors`` only, and each file's
header (names, dtypes, shapes) is checked against the manifest before any tensor is
allocated.

``load_bundle(path, load_tensors=False)`` checks everything but the tensor values and
never imports torch: the onnxruntime backend (``onnx_scorer.py``) reads its numbers from
the bundle's sha256-pinned ONNX graphs instead (manifest key ``onnx``, docs/BUNDLE.md),
which ``export_onnx`` wrote from this bundle's validated tensors (``onnx.source_sha256``
ties them to the manifest and every safetensors digest).

Loaded tensors are float32 and have normalised shapes (``k`` = number of columns the
component contributes to its layer's packed matrix, see ``pack.py``):

============  ==========================================================================
kind          ``Component.tensors``
============  ==========================================================================
linear_probe  ``weight [d_model, k]``, ``bias [k]``, optional ``mean [d_model]``,
              ``std [d_model]`` (std > 0)
sae_latents   ``W_enc [d_model, k]``, ``b_enc [k]``, ``threshold [k]`` (jumprelu),
              ``b_mag [k]``, ``r_mag [k]`` (gated; ``b_enc`` is the gate bias),
              optional ``b_dec [d_model]``
============  ==========================================================================

Kinds, their activations, tensor roles and shapes come from the one registry in
``kinds.py`` (SAE architectures register theirs in ``monitor/score/sae/``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from monitor.fileio import FileRefused, read_regular_file
from monitor.roles import SCOPE_WORDS
from monitor.wire.hooks import hook_key, parse_hook_name

from . import sae as _sae  # noqa: F401  (registers the SAE component kinds; no torch)
from .kinds import (
    NORMALIZE,
    Component,
    ComponentKind,
    FieldError,
    Preprocessing,
    activations_of,
    get_kind,
    kind_names,
)

if TYPE_CHECKING:  # torch is imported where tensor values are read or written
    import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Bundle",
    "BundleError",
    "Component",
    "DetectorInput",
    "DetectorSpec",
    "OnnxExport",
    "Preprocessing",
    "load_bundle",
    "source_digest",
    "write_bundle",
]

FORMAT = "safety-monitor-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

KINDS = kind_names()  # ("linear_probe", "sae_latents"), see kinds.py
#: A detector's token scope is one policy scope word (``monitor.roles.SCOPE_WORDS``):
#: ``prompt``, ``generated``, ``both`` or a token role such as ``user``.
TOKEN_SCOPES = SCOPE_WORDS
THRESHOLD_KEYS = ("warn", "critical")

#: safetensors dtypes accepted in a bundle (all upcast / cast to float32 on load).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

MAX_MANIFEST_BYTES = 16 << 20
DEFAULT_MAX_FILE_BYTES = 64 << 30
MAX_D_MODEL = 1 << 16
MAX_LAYERS = 1 << 12
MAX_COLUMNS = 1 << 20  # per component
MAX_FULL = 1 << 22  # full width of a full-width component (TopK: the SAE's d_sae)

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\.safetensors")
_ONNX_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\.onnx")
_SHA_RE = re.compile(r"[0-9a-f]{64}")

# Keys of each manifest object: (required, optional).
_TOP_KEYS = ({"format", "format_version", "name", "model", "files", "components",
              "detectors"}, {"description", "onnx"})
_ONNX_KEYS: tuple[set[str], set[str]] = (
    {"opset", "input_dtype", "source_sha256", "layers"}, set())
#: ONNX opsets the onnxruntime backend accepts (graphs use opset-17 operators only).
ONNX_OPSETS = (17,)
_MODEL_KEYS: tuple[set[str], set[str]] = ({"name", "d_model", "n_layers"}, set())
_COMPONENT_KEYS = ({"name", "kind", "layer", "tensors"},
                   {"hook_name", "activation", "latent_ids", "latent_labels",
                    "preprocessing"})
#: Longest `latent_labels` entry, in characters (a label travels on verdicts and alerts).
MAX_LATENT_LABEL_CHARS = 120
_PREPROCESSING_KEYS: tuple[set[str], set[str]] = (
    set(), {"scale", "normalize", "apply_b_dec_to_input", "layer_norm_eps"})
_DETECTOR_KEYS = ({"name", "inputs", "token_scope", "default_thresholds"},
                  {"description", "bias", "calibration", "provenance"})
_INPUT_KEYS = ({"component"}, {"weight", "latent_weights"})


class BundleError(FieldError):
    """A bundle was refused. ``str(e)`` is ``"<source>: <field>: expected <...>, found <...>"``."""


@dataclass(frozen=True)
class OnnxExport:
    """The bundle's ONNX graphs (manifest key ``onnx``; written by ``export_onnx``).

    ``files`` maps each detector layer to its graph (sha256-pinned in ``files``);
    ``source_sha256`` is :func:`source_digest` of the manifest they were exported from.
    """

    opset: int
    input_dtype: str
    source_sha256: str
    files: dict[int, Path]


@dataclass(frozen=True)
class DetectorInput:
    """One term of a detector's read-out: ``Σ_j weights[j] · z[component, j]``."""

    component: str
    weights: tuple[float, ...]  # length k of the component (a scalar weight gives (w,))


@dataclass(frozen=True)
class DetectorSpec:
    """A detector: ``score = sigmoid(Σ_inputs Σ_j w_j · z_j + bias)`` per row."""

    name: str
    description: str
    layer: int
    inputs: tuple[DetectorInput, ...]
    bias: float
    token_scope: str
    default_thresholds: dict[str, float]
    calibration: dict[str, Any]
    provenance: dict[str, Any]
    hook_name: str = ""  # the hook point all its inputs read; "" = resid_post of ``layer``

    def __post_init__(self) -> None:
        if not self.hook_name:
            object.__setattr__(self, "hook_name", hook_key(self.layer))


@dataclass(frozen=True, eq=False)
class Bundle:
    """A validated detector bundle.

    ``sha256`` is the SHA-256 of the ``manifest.json`` bytes. The manifest records the
    SHA-256 of every weights file and the loader verifies them, so this one digest pins
    the manifest and all weights: a stable identity for audit logs
    (``sha256sum manifest.json`` reproduces it).
    """

    path: Path
    name: str
    description: str
    format_version: int
    model_name: str
    d_model: int
    n_layers: int
    components: dict[str, Component]
    detectors: tuple[DetectorSpec, ...]
    sha256: str
    manifest: dict[str, Any]
    onnx: OnnxExport | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers read by at least one detector, ascending."""
        return tuple(sorted({d.layer for d in self.detectors}))

    def detector(self, name: str) -> DetectorSpec:
        for d in self.detectors:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def hook_names(self) -> tuple[str, ...]:
        """Hook points read by at least one detector, in forward order (layer, then
        resid_pre < resid_mid < mlp_out < resid_post; ``monitor.wire.hooks``)."""
        return tuple(h.name for h in sorted({parse_hook_name(d.hook_name)
                                             for d in self.detectors}))

    @property
    def resid_post_only(self) -> bool:
        """Every detector reads ``blocks.L.hook_resid_post`` (what ONNX export supports)."""
        return all(d.hook_name == hook_key(d.layer) for d in self.detectors)

    def detectors_on(self, point: int | str) -> tuple[DetectorSpec, ...]:
        """Detectors reading hook point ``point`` (a name, or a bare layer ``L`` =
        ``blocks.L.hook_resid_post``), in manifest order."""
        hook = hook_key(point)
        return tuple(d for d in self.detectors if d.hook_name == hook)

    def components_on(self, point: int | str) -> tuple[Component, ...]:
        """Components on hook point ``point`` (as in :meth:`detectors_on`), manifest order."""
        hook = hook_key(point)
        return tuple(c for c in self.components.values() if c.hook_name == hook)


# --------------------------------------------------------------------------- validation


def _show(value: Any, limit: int = 80) -> str:
    """A short rendering of a found value for error messages."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class _Checker:
    """Raises :class:`BundleError` for one manifest file; small typed accessors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, field: str, expected: str, found: str) -> BundleError:
        return BundleError(self.source, field, expected, found)

    def obj(self, value: Any, field: str, keys: tuple[set[str], set[str]]) -> dict[str, Any]:
        required, optional = keys
        if not isinstance(value, dict):
            raise self.fail(field, "an object", f"{_type_name(value)} {_show(value)}")
        for key in value:
            if key not in required and key not in optional:
                allowed = ", ".join(sorted(required | optional))
                raise self.fail(_join(field, key), f"one of the keys [{allowed}]",
                                f"unknown key {key!r}")
        for key in sorted(required):
            if key not in value:
                raise self.fail(_join(field, key), "a value (required)", "nothing")
        return value

    def free_obj(self, value: Any, field: str) -> dict[str, Any]:
        """A free-form JSON object (copied)."""
        if not isinstance(value, dict):
            raise self.fail(field, "an object", f"{_type_name(value)} {_show(value)}")
        return copy.deepcopy(value)

    def string(self, value: Any, field: str, *, pattern: re.Pattern[str] | None = None,
               what: str = "a string") -> str:
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            raise self.fail(field, what, _show(value))
        return value

    def choice(self, value: Any, field: str, options: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in options:
            raise self.fail(field, f"one of {list(options)}", _show(value))
        return value

    def integer(self, value: Any, field: str, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi)`` (bools are not integers here)."""
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
            raise self.fail(field, f"an integer in [{lo}, {hi})", _show(value))
        return value

    def number(self, value: Any, field: str, *, what: str = "a finite number") -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise self.fail(field, what, _show(value))
        return float(value)

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, "true or false", _show(value))
        return value

    def array(self, value: Any, field: str, *, nonempty: bool = False) -> list[Any]:
        if not isinstance(value, list) or (nonempty and not value):
            raise self.fail(field, "a non-empty list" if nonempty else "a list", _show(value))
        return value


def _join(parent: str, key: str) -> str:
    return key if not parent else f"{parent}.{key}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _fmt_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# --------------------------------------------------------------------------- load


def load_bundle(path: str | os.PathLike[str], *,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                load_tensors: bool = True) -> Bundle:
    """Load and validate the bundle directory ``path``; raise :class:`BundleError` if invalid.

    Weights files larger than ``max_file_bytes`` are refused before they are read.
    ``load_tensors=False``: names, dtypes, shapes (headers) and every file's sha256 are
    checked, tensor values are not read (``Component.tensors`` is empty) and torch is not
    imported; for the onnxruntime backend, which scores with the ONNX graphs.
    """
    root = Path(path)
    source = f"{root}/{MANIFEST}"
    ck = _Checker(source)
    raw = _read_manifest_bytes(root / MANIFEST, ck)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ck.fail("$", "a UTF-8 JSON document", f"invalid JSON ({e})") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise ck.fail("$", "a JSON document of ordinary nesting",
                      "nesting deeper than the parser's recursion limit") from None

    top = ck.obj(doc, "", _TOP_KEYS)
    if top["format"] != FORMAT:
        raise ck.fail("format", repr(FORMAT), _show(top["format"]))
    if isinstance(top["format_version"], bool) or top["format_version"] != FORMAT_VERSION:
        raise ck.fail("format_version", str(FORMAT_VERSION), _show(top["format_version"]))
    name = ck.string(top["name"], "name", pattern=_NAME_RE, what="a name matching "
                     f"{_NAME_RE.pattern}")
    description = ck.string(top.get("description", ""), "description")
    model = ck.obj(top["model"], "model", _MODEL_KEYS)
    model_name = ck.string(model["name"], "model.name", what="a non-empty string")
    if not model_name:
        raise ck.fail("model.name", "a non-empty string", '""')
    d_model = ck.integer(model["d_model"], "model.d_model", 1, MAX_D_MODEL + 1)
    n_layers = ck.integer(model["n_layers"], "model.n_layers", 1, MAX_LAYERS + 1)

    index, onnx_files = _check_files(root, top["files"], ck, max_file_bytes)
    components = _check_components(top["components"], ck, index, d_model, n_layers,
                                   load_tensors)
    detectors = _check_detectors(top["detectors"], ck, components)
    layers = sorted({d.layer for d in detectors})
    onnx = _check_onnx(top, ck, root, onnx_files, layers, n_layers)
    if onnx is not None:
        for cname, comp in components.items():
            if get_kind(comp.kind, comp.activation).full_width:
                raise ck.fail("onnx", f"no onnx section (component {cname!r} is "
                              f"{comp.activation}: no ONNX graph)", "a section")
        for d in detectors:
            if d.hook_name != hook_key(d.layer):
                raise ck.fail("onnx", f"no onnx section (graphs read resid_post only; "
                              f"detector {d.name!r} reads {d.hook_name})", "a section")

    used = {i.component for d in detectors for i in d.inputs}
    for position, comp in enumerate(components.values()):
        if comp.name not in used:
            raise ck.fail(f"components[{position}].name",
                          "a component read by at least one detector",
                          f"{comp.name!r}, which no detector reads")

    return Bundle(
        path=root, name=name, description=description, format_version=FORMAT_VERSION,
        model_name=model_name, d_model=d_model, n_layers=n_layers, components=components,
        detectors=detectors, sha256=hashlib.sha256(raw).hexdigest(), manifest=copy.deepcopy(doc),
        onnx=onnx,
    )


def source_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest without its ONNX part (key ``onnx``, ``.onnx`` files).

    Canonical JSON (sorted keys, no spaces). It covers every component, detector and
    safetensors digest: what an exported ONNX graph was computed from.
    """
    doc = {k: v for k, v in manifest.items() if k != "onnx"}
    files = doc.get("files")
    if isinstance(files, dict):
        doc["files"] = {f: d for f, d in files.items() if not str(f).endswith(".onnx")}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_onnx(top: dict[str, Any], ck: _Checker, root: Path, onnx_files: set[str],
                layers: list[int], n_layers: int) -> OnnxExport | None:
    """The optional ``onnx`` section: one pinned graph per detector layer, fresh digest."""
    if "onnx" not in top:
        if onnx_files:
            raise ck.fail("onnx", f"a section naming the ONNX files {sorted(onnx_files)}",
                          "nothing")
        return None
    sec = ck.obj(top["onnx"], "onnx", _ONNX_KEYS)
    opset = sec["opset"]
    if isinstance(opset, bool) or opset not in ONNX_OPSETS:
        raise ck.fail("onnx.opset", f"one of {list(ONNX_OPSETS)}", _show(opset))
    input_dtype = ck.choice(sec["input_dtype"], "onnx.input_dtype", ("float32",))
    src = ck.string(sec["source_sha256"], "onnx.source_sha256", pattern=_SHA_RE,
                    what="a sha256 hex digest")
    actual = source_digest(top)
    if src != actual:
        raise ck.fail("onnx.source_sha256", f"{actual} (the digest of this manifest without "
                      "its onnx part: re-run `safety-monitor export-onnx`)", src)
    if not isinstance(sec["layers"], dict):
        raise ck.fail("onnx.layers", "an object {layer: file name}", _show(sec["layers"]))
    files: dict[int, Path] = {}
    for key, fname in sec["layers"].items():
        where = f"onnx.layers[{key!r}]"
        if not (isinstance(key, str) and key.isdigit() and int(key) < n_layers):
            raise ck.fail(where, f"a layer number in [0, {n_layers})", repr(key))
        if not isinstance(fname, str) or fname not in onnx_files:
            raise ck.fail(where, f"an .onnx file listed in files {sorted(onnx_files)}",
                          _show(fname))
        files[int(key)] = root / fname
    if sorted(files) != layers:
        raise ck.fail("onnx.layers", f"one graph for each detector layer {layers}",
                      f"layers {sorted(files)}")
    unused = onnx_files - {p.name for p in files.values()}
    if unused:
        raise ck.fail("files", "every .onnx file named in onnx.layers", f"{sorted(unused)}")
    return OnnxExport(opset=opset, input_dtype=input_dtype, source_sha256=src, files=files)


def _read_manifest_bytes(path: Path, ck: _Checker) -> bytes:
    try:
        return read_regular_file(path, MAX_MANIFEST_BYTES)
    except FileRefused as e:
        raise ck.fail("$", e.expected, e.found) from None
    except OSError as e:
        raise ck.fail("$", "a readable manifest file", f"{type(e).__name__}: {e.strerror}") \
            from None


def _check_files(root: Path, files: Any, ck: _Checker,
                 max_file_bytes: int) -> tuple[dict[str, _TensorInfo], set[str]]:
    """Verify every listed file (name, size, sha256; safetensors header); index tensors.

    Returns the tensor index and the names of the ``.onnx`` files (checked by name, size
    and sha256 here; their content when a scorer loads them).
    """
    if not isinstance(files, dict) or not files:
        raise ck.fail("files", "a non-empty object {file name: sha256}", _show(files))
    index: dict[str, _TensorInfo] = {}
    onnx_files: set[str] = set()
    for fname, digest in files.items():
        where = f"files[{fname!r}]"
        is_onnx = bool(_ONNX_FILE_RE.fullmatch(fname))
        if not _FILE_RE.fullmatch(fname) and not is_onnx:
            raise ck.fail(where, "a plain file name ending in .safetensors or .onnx",
                          repr(fname))
        if not isinstance(digest, str) or not _SHA_RE.fullmatch(digest):
            raise ck.fail(where, "a sha256 hex digest (64 lowercase hex digits)", _show(digest))
        fpath = root / fname
        if not fpath.is_file():
            raise ck.fail(where, f"a regular file {fpath}", "no such file")
        size = fpath.stat().st_size
        if size > max_file_bytes:
            raise ck.fail(where, f"a file of at most {max_file_bytes} bytes", f"{size} bytes")
        actual = _sha256_file(fpath)
        if actual != digest:
            raise ck.fail(where, f"sha256 {digest}", f"sha256 {actual}")
        if is_onnx:
            onnx_files.add(fname)
            continue
        try:
            with safe_open(str(fpath), framework="numpy") as f:  # headers only
                for tname in f.keys():
                    sl = f.get_slice(tname)
                    if tname in index:
                        raise ck.fail(where, "tensor names unique across files",
                                      f"{tname!r} also in {index[tname].file.name}")
                    index[tname] = _TensorInfo(fpath, sl.get_dtype(), tuple(sl.get_shape()))
        except BundleError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise ck.fail(where, "a valid safetensors file", f"{type(e).__name__}: {e}") \
                from None
    if not index:
        raise ck.fail("files", "at least one .safetensors file", _show(sorted(files)))
    return index, onnx_files


def _unique_name(ck: _Checker, value: Any, where: str, taken: Container[str],
                 among: str) -> str:
    """`<where>.name`: a valid name not already in `taken` (names of earlier `among`)."""
    name = ck.string(value, f"{where}.name", pattern=_NAME_RE,
                     what=f"a name matching {_NAME_RE.pattern}")
    if name in taken:
        raise ck.fail(f"{where}.name", f"a name unique among {among}", f"duplicate {name!r}")
    return name


def _check_components(items: Any, ck: _Checker, index: dict[str, _TensorInfo],
                      d_model: int, n_layers: int, load_tensors: bool) -> dict[str, Component]:
    ck.array(items, "components", nonempty=True)
    out: dict[str, Component] = {}
    for i, item in enumerate(items):
        where = f"components[{i}]"
        c = ck.obj(item, where, _COMPONENT_KEYS)
        name = _unique_name(ck, c["name"], where, out, "components")
        kind = ck.choice(c["kind"], f"{where}.kind", KINDS)
        layer = ck.integer(c["layer"], f"{where}.layer", 0, n_layers)
        hook = hook_key(layer)
        if "hook_name" in c:
            raw = ck.string(c["hook_name"], f"{where}.hook_name", what="a hook point name")
            try:
                hp = parse_hook_name(raw, field=f"{where}.hook_name")
            except ValueError:
                raise ck.fail(f"{where}.hook_name", "'blocks.<layer>.hook_<kind>' with kind "
                              "in resid_pre, resid_mid, mlp_out, resid_post",
                              _show(raw)) from None
            if hp.layer != layer:
                raise ck.fail(f"{where}.hook_name", f"a hook point of layer {layer}",
                              _show(raw))
            hook = hp.name

        acts = activations_of(kind)
        if "activation" not in c and len(acts) > 1:
            raise ck.fail(f"{where}.activation", f"one of {list(acts)}", "nothing")
        activation = ck.choice(c.get("activation", acts[0]), f"{where}.activation", acts)
        spec = get_kind(kind, activation)
        pre = _check_preprocessing(c.get("preprocessing", {}), f"{where}.preprocessing", ck)

        roles, k, tensors = _check_tensors(c["tensors"], f"{where}.tensors", spec, ck,
                                           index, d_model, load_tensors)
        if pre.apply_b_dec_to_input and "b_dec" not in roles:
            raise ck.fail(f"{where}.preprocessing.apply_b_dec_to_input",
                          "false unless the component has a b_dec tensor", "true")

        latent_ids: tuple[int, ...] | None = None
        if kind == "sae_latents" and "latent_ids" not in c:
            raise ck.fail(f"{where}.latent_ids", f"a list of {k} latent indices", "nothing")
        if "latent_ids" in c:
            ids = ck.array(c["latent_ids"], f"{where}.latent_ids")
            if len(ids) != k:
                raise ck.fail(f"{where}.latent_ids", f"{k} latent indices (one per column)",
                              f"{len(ids)}")
            latent_ids = tuple(ck.integer(v, f"{where}.latent_ids[{j}]", 0, 1 << 31)
                               for j, v in enumerate(ids))
            if len(set(latent_ids)) != k:
                raise ck.fail(f"{where}.latent_ids", "distinct latent indices",
                              _show(list(latent_ids)))

        if spec.full_width:
            _check_full_width(ck, where, pre, latent_ids, tensors)

        labels: tuple[str, ...] | None = None
        if "latent_labels" in c:
            if latent_ids is None:
                raise ck.fail(f"{where}.latent_labels", "no labels without latent_ids",
                              "labels")
            raw_labels = ck.array(c["latent_labels"], f"{where}.latent_labels")
            if len(raw_labels) != k:
                raise ck.fail(f"{where}.latent_labels", f"{k} labels (one per column)",
                              f"{len(raw_labels)}")
            labels = tuple(ck.string(v, f"{where}.latent_labels[{j}]") for j, v in
                           enumerate(raw_labels))
            for j, text in enumerate(labels):
                if len(text) > MAX_LATENT_LABEL_CHARS:
                    raise ck.fail(f"{where}.latent_labels[{j}]",
                                  f"at most {MAX_LATENT_LABEL_CHARS} characters",
                                  f"{len(text)}")

        out[name] = Component(name=name, kind=kind, layer=layer, hook_name=hook,
                              tensors=tensors, activation=activation, latent_ids=latent_ids,
                              preprocessing=pre, k=k, latent_labels=labels)
    return out


def _check_full_width(ck: _Checker, where: str, pre: Preprocessing,
                      latent_ids: tuple[int, ...] | None,
                      tensors: Mapping[str, torch.Tensor]) -> None:
    """A TopK component: normalize none; ``latent_ids`` index the full width and the
    selected tensors equal the full ones there; ``topk_k`` an integer in [1, m]."""
    if pre.normalize != "none":
        raise ck.fail(f"{where}.preprocessing.normalize", "'none' for a topk component",
                      repr(pre.normalize))
    if not tensors or latent_ids is None:
        return  # shapes only (load_tensors=False), or refused elsewhere
    m = int(tensors["W_enc_full"].shape[1])
    if max(latent_ids) >= m:
        raise ck.fail(f"{where}.latent_ids", f"indices in [0, {m}) (the full width)",
                      str(max(latent_ids)))
    kk = float(tensors["topk_k"])
    if kk != int(kk) or not 1 <= kk <= m:
        raise ck.fail(f"{where}.tensors.topk_k", f"an integer in [1, {m}]", repr(kk))
    import torch

    idx = torch.tensor(list(latent_ids))
    for sel, full in (("W_enc", "W_enc_full"), ("b_enc", "b_enc_full"),
                      ("rank_scale", "rank_scale_full")):
        if (sel in tensors) != (full in tensors):
            raise ck.fail(f"{where}.tensors.{sel}", f"present exactly when {full} is",
                          "one of them")
        if sel in tensors:
            want = tensors[full][..., idx] if sel == "W_enc" else tensors[full][idx]
            if not torch.equal(tensors[sel], want):
                raise ck.fail(f"{where}.tensors.{sel}", f"{full} at latent_ids",
                              "different values")


def _check_preprocessing(value: Any, where: str, ck: _Checker) -> Preprocessing:
    p = ck.obj(value, where, _PREPROCESSING_KEYS)
    scale = ck.number(p.get("scale", 1.0), f"{where}.scale", what="a finite number > 0")
    if scale <= 0:
        raise ck.fail(f"{where}.scale", "a finite number > 0", _show(p["scale"]))
    eps = ck.number(p.get("layer_norm_eps", 1e-5), f"{where}.layer_norm_eps",
                    what="a finite number > 0")
    if eps <= 0:
        raise ck.fail(f"{where}.layer_norm_eps", "a finite number > 0",
                      _show(p["layer_norm_eps"]))
    return Preprocessing(
        scale=scale,
        normalize=ck.choice(p.get("normalize", "none"), f"{where}.normalize", NORMALIZE),
        apply_b_dec_to_input=ck.boolean(p.get("apply_b_dec_to_input", False),
                                        f"{where}.apply_b_dec_to_input"),
        layer_norm_eps=eps,
    )


def _check_tensors(value: Any, where: str, spec: ComponentKind, ck: _Checker,
                   index: dict[str, _TensorInfo], d_model: int, load_tensors: bool
                   ) -> tuple[set[str], int, dict[str, torch.Tensor]]:
    """Check roles, dtypes and shapes (from the headers, against ``spec``: kinds.py), then
    load and check the values.

    Returns (roles present, k, tensors); tensors are ``{}`` without ``load_tensors``.
    """
    required = set(spec.required) | {spec.main}
    optional = (set(spec.roles) | {spec.main}) - required
    roles = ck.obj(value, where, (required, optional))

    infos: dict[str, _TensorInfo] = {}
    for role, tname in roles.items():
        ck.string(tname, f"{where}.{role}", what="a tensor name")
        if tname not in index:
            raise ck.fail(f"{where}.{role}", "a tensor present in the weights files",
                          f"no tensor named {tname!r}")
        info = index[tname]
        if info.dtype not in FLOAT_DTYPES:
            raise ck.fail(f"{where}.{role}", f"a floating dtype {list(FLOAT_DTYPES)}",
                          f"{info.dtype} ({tname!r})")
        infos[role] = info

    # Shapes, from the headers only.
    main = spec.main
    shape = infos[main].shape
    if spec.vector_main and len(shape) == 1:
        if shape != (d_model,):
            raise ck.fail(f"{where}.{main}", f"shape [{d_model}] or [{d_model}, k]",
                          _fmt_shape(shape))
        k = 1
    elif len(shape) != 2 or shape[0] != d_model or not 1 <= shape[1] <= MAX_COLUMNS:
        raise ck.fail(f"{where}.{main}", f"shape [{d_model}, k] with 1 <= k <= {MAX_COLUMNS}",
                      _fmt_shape(shape))
    else:
        k = shape[1]
    m = k
    for role, info in infos.items():  # the full width of a full-width kind (TopK)
        if spec.roles.get(role) == "d_model_m":
            shape_m = info.shape
            if len(shape_m) != 2 or shape_m[0] != d_model or not k <= shape_m[1] <= MAX_FULL:
                raise ck.fail(f"{where}.{role}", f"shape [{d_model}, m] with {k} <= m <= "
                              f"{MAX_FULL}", _fmt_shape(shape_m))
            m = shape_m[1]
    allowed: dict[str, tuple[tuple[int, ...], ...]] = {
        "k": ((k,),), "d_model": ((d_model,),),
        "k_or_scalar": ((k,), ()) if k == 1 else ((k,),),
        "d_model_m": ((d_model, m),), "m": ((m,),), "scalar": ((),)}
    for role, info in infos.items():
        if role == main:
            continue
        want_shapes = allowed[spec.roles[role]]
        if info.shape not in want_shapes:
            want = " or ".join(_fmt_shape(s) for s in want_shapes)
            raise ck.fail(f"{where}.{role}", f"shape {want}", _fmt_shape(info.shape))

    if not load_tensors:
        return set(infos), k, {}
    import torch

    # Values: load (float32), finite, positive where the kind says so (probe std).
    out: dict[str, torch.Tensor] = {}
    for role, info in infos.items():
        with safe_open(str(info.file), framework="pt") as f:
            t = f.get_tensor(roles[role]).to(torch.float32)
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(v) for v in bad.nonzero()[0].tolist())
            raise ck.fail(f"{where}.{role}", "finite values (as float32)",
                          f"{int(bad.sum())} non-finite values, first at index {list(first)}")
        if role in spec.positive and bool((t <= 0).any()):
            j = int(torch.argmin(t))
            raise ck.fail(f"{where}.{role}", "all values > 0", f"{float(t[j])!r} at index {j}")
        out[role] = t
    out[main] = out[main].reshape(d_model, k)
    for role, shape_kind in spec.roles.items():
        if shape_kind == "k_or_scalar" and role in out:
            out[role] = out[role].reshape(k)
    return set(infos), k, out


def _check_detectors(items: Any, ck: _Checker,
                     components: dict[str, Component]) -> tuple[DetectorSpec, ...]:
    ck.array(items, "detectors", nonempty=True)
    out: list[DetectorSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"detectors[{i}]"
        d = ck.obj(item, where, _DETECTOR_KEYS)
        name = _unique_name(ck, d["name"], where, seen, "detectors")
        seen.add(name)

        inputs: list[DetectorInput] = []
        layer: int | None = None
        hook: str | None = None
        for j, raw in enumerate(ck.array(d["inputs"], f"{where}.inputs", nonempty=True)):
            iw = f"{where}.inputs[{j}]"
            inp = ck.obj(raw, iw, _INPUT_KEYS)
            cname = ck.string(inp["component"], f"{iw}.component", what="a component name")
            if cname not in components:
                raise ck.fail(f"{iw}.component", f"one of the components {list(components)}",
                              repr(cname))
            if any(x.component == cname for x in inputs):
                raise ck.fail(f"{iw}.component", "each component at most once per detector",
                              f"{cname!r} again")
            comp = components[cname]
            if layer is None:
                layer, hook = comp.layer, comp.hook_name
            elif comp.layer != layer:
                raise ck.fail(f"{iw}.component", f"a component on layer {layer} (all inputs "
                              "of a detector share one layer)",
                              f"{cname!r} on layer {comp.layer}")
            elif comp.hook_name != hook:
                raise ck.fail(f"{iw}.component", f"a component on {hook} (all inputs of a "
                              "detector share one hook point)",
                              f"{cname!r} on {comp.hook_name}")
            inputs.append(DetectorInput(cname, _check_input_weights(inp, iw, comp, ck)))
        assert layer is not None and hook is not None

        out.append(DetectorSpec(
            name=name,
            description=ck.string(d.get("description", ""), f"{where}.description"),
            layer=layer,
            inputs=tuple(inputs),
            bias=ck.number(d.get("bias", 0.0), f"{where}.bias"),
            token_scope=ck.choice(d["token_scope"], f"{where}.token_scope", TOKEN_SCOPES),
            default_thresholds=_check_thresholds(d["default_thresholds"],
                                                 f"{where}.default_thresholds", ck),
            calibration=ck.free_obj(d.get("calibration", {}), f"{where}.calibration"),
            provenance=ck.free_obj(d.get("provenance", {}), f"{where}.provenance"),
            hook_name=hook,
        ))
    return tuple(out)


def _check_input_weights(inp: dict[str, Any], where: str, comp: Component,
                         ck: _Checker) -> tuple[float, ...]:
    has_w, has_lw = "weight" in inp, "latent_weights" in inp
    if has_w == has_lw:
        raise ck.fail(where, "exactly one of 'weight' (k = 1) or 'latent_weights' (k values)",
                      "both" if has_w else "neither")
    if has_w:
        if comp.k != 1:
            raise ck.fail(f"{where}.weight", f"'latent_weights' with {comp.k} values "
                          f"(component {comp.name!r} has k = {comp.k})", "a scalar weight")
        return (ck.number(inp["weight"], f"{where}.weight"),)
    lw = ck.array(inp["latent_weights"], f"{where}.latent_weights")
    if len(lw) != comp.k:
        raise ck.fail(f"{where}.latent_weights",
                      f"{comp.k} weights (k of component {comp.name!r})", f"{len(lw)}")
    return tuple(ck.number(v, f"{where}.latent_weights[{j}]") for j, v in enumerate(lw))


def _check_thresholds(value: Any, where: str, ck: _Checker) -> dict[str, float]:
    t = ck.obj(value, where, (set(), set(THRESHOLD_KEYS)))
    if not t:
        raise ck.fail(where, f"at least one of {list(THRESHOLD_KEYS)}", "{}")
    out: dict[str, float] = {}
    for key in THRESHOLD_KEYS:
        if key in t:
            v = ck.number(t[key], f"{where}.{key}", what="a number in (0, 1)")
            if not 0.0 < v < 1.0:
                raise ck.fail(f"{where}.{key}", "a number in (0, 1)", _show(t[key]))
            out[key] = v
    if "warn" in out and "critical" in out and not out["warn"] < out["critical"]:
        raise ck.fail(f"{where}.warn", f"warn < critical ({out['critical']})",
                      f"{out['warn']}")
    return out


# --------------------------------------------------------------------------- write


def write_bundle(path: str | os.PathLike[str], manifest: Mapping[str, Any],
                 tensors: Mapping[str, torch.Tensor],
                 filename: str = "weights.safetensors") -> Bundle:
    """Write a bundle directory and return it as loaded (and so validated) by load_bundle.

    ``manifest`` is the manifest.json content without ``files`` (any given ``files`` is
    replaced); ``format`` and ``format_version`` are filled in when absent. ``tensors``
    maps tensor names (as referenced by the components' ``tensors``) to tensors, written
    as they are (float32 recommended) into ``path/filename``. The directory is created
    if needed; an existing manifest.json or ``filename`` there is overwritten.

    Raises :class:`BundleError` if the result does not validate.
    """
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if not _FILE_RE.fullmatch(filename):
        raise BundleError(f"{root}/{MANIFEST}", "files", "a plain file name ending in "
                          ".safetensors", repr(filename))
    data = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    weights = root / filename
    save_file(data, str(weights))
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    doc.update(copy.deepcopy(dict(manifest)))
    doc["files"] = {filename: _sha256_file(weights)}
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return load_bundle(root)
