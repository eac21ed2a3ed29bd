"""Readers for published SAE file layouts, all returning :class:`~.model.SAE`.

=====================  ===========================================  =====================
format                 files                                        architecture
=====================  ===========================================  =====================
SAELens                ``cfg.json`` + ``sae_weights.safetensors``    cfg ``architecture``
Gemma Scope            ``params.npz`` (+ hook/model given)          jumprelu
Llama Scope            ``hyperparams.json`` +                       jumprelu (or topk)
                       ``checkpoints/final.safetensors``
EleutherAI sparsify    ``cfg.json`` + ``sae.safetensors`` in a      topk
                       folder named after the hookpoint
OpenAI                 a torch state dict: converted once by        standard / topk
sparse_autoencoder     :func:`convert_openai` (``weights_only``)
                       to the SAELens layout
=====================  ===========================================  =====================

Encode conventions (each matches its source's own code):

* SAELens: ``pre(x)`` = ``normalize_activations`` (``none``; ``layer_norm`` =
  ``(x − μ)/(std + 1e-5)``, unbiased std), then ``− b_dec`` if ``apply_b_dec_to_input``.
  ``expected_average_only_in`` is a dataset-norm scale that is *not* in the files:
  pass ``norm_scaling_factor`` (SAELens folds it from its pretrained registry) or the
  load is refused.
* Gemma Scope: JumpReLU on the raw activation, no ``b_dec`` subtraction.
* Llama Scope: ``s = √d_model / dataset_average_activation_norm.in``,
  ``h = (s·x)·W_encᵀ + b``, ``z = relu(h)·[h > s·θ]`` with one scalar θ
  (as SAELens's loader folds it).
* sparsify: ``h = (x − b_dec)·W_encᵀ + b`` (transcoders: no ``b_dec``), top-k of
  ``relu(h)``.

Nothing is unpickled: safetensors, ``np.load(allow_pickle=False)``, and for OpenAI's
``.pt`` state dicts ``torch.load(weights_only=True)`` in the offline converter only.
Every tensor's shape and dtype is checked against the config before use; a mismatch
raises :class:`~.registry.SAEError` naming the file, field, expected and found.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..kinds import Preprocessing
from .model import SAE
from .registry import SAEError, architectures, get_architecture

__all__ = ["convert_openai", "load_gemma_scope", "load_llama_scope", "load_sae",
           "load_saelens", "load_sparsify", "save_saelens"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_CFG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 64 << 30

#: SAELens architecture name -> (our architecture, transcoder?)
_SAELENS_ARCHS = {
    "standard": ("standard", False),
    "jumprelu": ("jumprelu", False),
    "gated": ("gated", False),
    "topk": ("topk", False),
    "transcoder": ("standard", True),
    "skip_transcoder": ("standard", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_SAELENS_NORMALIZE = {"none": "none", "layer_norm": "layer_norm_std"}


def _read_json(path: Path) -> dict[str, Any]:
    src = str(path)
    if not path.is_file():
        raise SAEError(src, "$", "a readable JSON file", "no such file")
    if path.stat().st_size > MAX_CFG_BYTES:
        raise SAEError(src, "$", f"at most {MAX_CFG_BYTES} bytes", f"{path.stat().st_size}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SAEError(src, "$", "a UTF-8 JSON document", f"invalid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise SAEError(src, "$", "a JSON object", type(doc).__name__)
    return doc


def _int(cfg: Mapping[str, Any], key: str, src: str, lo: int = 1, hi: int = 1 << 24) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
        raise SAEError(src, key, f"an integer in [{lo}, {hi})", json.dumps(v))
    return v


def _read_safetensors(path: Path, want: Mapping[str, tuple[int, ...]],
                      optional: Mapping[str, tuple[int, ...]] | None = None,
                      rename: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors named in ``want`` (required) / ``optional`` after checking each
    header's dtype and shape; returns float32 tensors keyed by ``rename[name]`` or name."""
    src = str(path)
    if not path.is_file():
        raise SAEError(src, "$", "a safetensors file", "no such file")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise SAEError(src, "$", f"at most {MAX_WEIGHTS_BYTES} bytes", f"{path.stat().st_size}")
    out: dict[str, torch.Tensor] = {}
    try:
        f = safe_open(src, framework="pt")
    except Exception as e:  # safetensors raises its own types
        raise SAEError(src, "$", "a valid safetensors file", f"{type(e).__name__}: {e}") \
            from None
    names = set(f.keys())
    for table, required in ((want, True), (optional or {}, False)):
        for name, shape in table.items():
            if name not in names:
                if required:
                    raise SAEError(src, name, f"a tensor of shape {list(shape)}",
                                   f"nothing (tensors: {sorted(names)})")
                continue
            sl = f.get_slice(name)
            dtype, found = sl.get_dtype(), tuple(sl.get_shape())
            if dtype not in FLOAT_DTYPES:
                raise SAEError(src, name, f"a floating dtype {list(FLOAT_DTYPES)}", dtype)
            if found != tuple(shape):
                raise SAEError(src, name, f"shape {list(shape)}", f"{list(found)}")
            t = f.get_tensor(name).to(torch.float32)
            if not bool(torch.isfinite(t).all()):
                raise SAEError(src, name, "finite values (as float32)",
                               f"{int((~torch.isfinite(t)).sum())} non-finite values")
            out[(rename or {}).get(name, name)] = t
    return out


# --------------------------------------------------------------------------- SAELens


def load_saelens(path: str | os.PathLike[str], *, norm_scaling_factor: float | None = None,
                 d_model: int | None = None) -> SAE:
    """An SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    root = Path(path)
    cfg_path = root / SAELENS_CFG
    src = str(cfg_path)
    cfg = _read_json(cfg_path)
    raw_meta = cfg.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    arch_name = cfg.get("architecture")
    if arch_name is None:  # SAELens < 4 configs: activation_fn_str
        act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
        arch_name = "topk" if act == "topk" else "standard"
    if arch_name not in _SAELENS_ARCHS:
        raise SAEError(src, "architecture", f"one of {sorted(_SAELENS_ARCHS)}",
                       json.dumps(arch_name))
    arch, transcoder = _SAELENS_ARCHS[arch_name]
    d_in = _int(cfg, "d_in", src)
    d_sae = _int(cfg, "d_sae", src)
    d_out = _int(cfg, "d_out", src) if transcoder and "d_out" in cfg else d_in
    if d_model is not None and d_in != d_model:
        raise SAEError(src, "d_in", f"the model's d_model {d_model}", str(d_in))
    hook = meta.get("hook_name", cfg.get("hook_name"))
    if not isinstance(hook, str) or not hook:
        raise SAEError(src, "metadata.hook_name", "a TransformerLens hook name", json.dumps(hook))
    model_name = str(meta.get("model_name", cfg.get("model_name", "")))

    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise SAEError(src, "apply_b_dec_to_input", "true or false", json.dumps(apply_b_dec))
    if transcoder and apply_b_dec:
        raise SAEError(src, "apply_b_dec_to_input", "false for a transcoder", "true")
    norm = cfg.get("normalize_activations", "none")
    scale = 1.0
    if norm == "expected_average_only_in":
        if norm_scaling_factor is None:
            raise SAEError(src, "normalize_activations",
                           "'none' or 'layer_norm', or 'expected_average_only_in' with "
                           "norm_scaling_factor given (it is not stored in the files)",
                           '"expected_average_only_in" without norm_scaling_factor')
        if not (math.isfinite(norm_scaling_factor) and norm_scaling_factor > 0):
            raise SAEError(src, "norm_scaling_factor", "a finite number > 0",
                           repr(norm_scaling_factor))
        scale, normalize = float(norm_scaling_factor), "none"
    elif norm in _SAELENS_NORMALIZE:
        normalize = _SAELENS_NORMALIZE[norm]
    else:
        raise SAEError(src, "normalize_activations",
                       "one of ['none', 'layer_norm', 'expected_average_only_in']",
                       json.dumps(norm))
    if cfg.get("reshape_activations", "none") != "none":
        raise SAEError(src, "reshape_activations", '"none" (hook_z SAEs are not captured)',
                       json.dumps(cfg.get("reshape_activations")))

    k: int | None = None
    rescale = False
    if arch == "topk":
        raw_kw = cfg.get("activation_fn_kwargs")
        kw: dict[str, Any] = raw_kw if isinstance(raw_kw, dict) else {}
        k = _int({"k": cfg.get("k", kw.get("k"))}, "k", src, 1, d_sae + 1)
        rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))

    a = get_architecture(arch)
    want: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out),
                                        "b_dec": (d_out,)}
    want.update({p: (d_sae,) for p in a.params})
    params = _read_safetensors(root / SAELENS_WEIGHTS, want)
    return SAE(architecture=arch, d_in=d_in, d_sae=d_sae, d_out=d_out, hook_name=hook,
               model_name=model_name, params=params,
               preprocessing=Preprocessing(scale=scale, normalize=normalize,
                                           apply_b_dec_to_input=apply_b_dec),
               k=k, rescale_acts_by_decoder_norm=rescale, transcoder=transcoder,
               source=str(root))


def save_saelens(sae: SAE, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                 extra_metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` as an SAELens folder (loadable by ``sae_lens.SAE.load_from_disk``
    and :func:`load_saelens`). Only formats SAELens can express: scale must be 1."""
    if sae.preprocessing.scale != 1.0 or sae.preprocessing.normalize == "layer_norm":
        raise ValueError("save_saelens: fold the scale first (SAELens files have no scale), "
                         "and only normalize 'none' / 'layer_norm_std' exist in SAELens")
    names = {v: k for k, (v, tc) in _SAELENS_ARCHS.items() if not tc}
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "architecture": names[sae.architecture], "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": sae.preprocessing.apply_b_dec_to_input,
        "normalize_activations": "layer_norm" if sae.preprocessing.normalize != "none"
        else "none",
        "reshape_activations": "none",
        "metadata": {"model_name": sae.model_name, "hook_name": sae.hook_name,
                     **dict(extra_metadata or {})},
    }
    if sae.k is not None:
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = sae.rescale_acts_by_decoder_norm
    save_file({n: t.to(dtype).contiguous() for n, t in sae.params.items()},
              str(root / SAELENS_WEIGHTS))
    (root / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return root


# --------------------------------------------------------------------------- Gemma Scope


def load_gemma_scope(path: str | os.PathLike[str], *, hook_name: str, model_name: str = "",
                     d_model: int | None = None) -> SAE:
    """A Gemma Scope ``params.npz`` (``path`` is the file or its folder). The files do
    not name the hook point: pass it (e.g. ``"blocks.12.hook_resid_post"``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "params.npz"
    src = str(p)
    if not p.is_file():
        raise SAEError(src, "$", "a params.npz file", "no such file")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except ValueError as e:
        raise SAEError(src, "$", "an npz of plain numeric arrays", str(e)) from None
    for key in ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"):
        if key not in arrays:
            raise SAEError(src, key, "an array", f"nothing (arrays: {sorted(arrays)})")
        if arrays[key].dtype.kind != "f":
            raise SAEError(src, key, "a floating array", str(arrays[key].dtype))
    d_in, d_sae = (int(s) for s in arrays["W_enc"].shape)
    if d_model is not None and d_in != d_model:
        raise SAEError(src, "W_enc", f"shape [{d_model}, d_sae] (the model's d_model)",
                       f"{list(arrays['W_enc'].shape)}")
    shapes = {"b_enc": (d_sae,), "threshold": (d_sae,), "W_dec": (d_sae, d_in),
              "b_dec": (d_in,)}
    for key, shape in shapes.items():
        if tuple(arrays[key].shape) != shape:
            raise SAEError(src, key, f"shape {list(shape)}", f"{list(arrays[key].shape)}")
    if "scaling_factor" in arrays and not np.allclose(arrays["scaling_factor"], 1.0):
        raise SAEError(src, "scaling_factor", "all ones (no finetuning scale)",
                       "other values")
    params = {k: torch.from_numpy(arrays[k].astype(np.float32)) for k in
              ("W_enc", "b_enc", "threshold", "W_dec", "b_dec")}
    return SAE(architecture="jumprelu", d_in=d_in, d_sae=d_sae, d_out=d_in,
               hook_name=hook_name, model_name=model_name, params=params,
               preprocessing=Preprocessing(apply_b_dec_to_input=False), source=src)


# --------------------------------------------------------------------------- Llama Scope


def load_llama_scope(path: str | os.PathLike[str], *, model_name: str = "",
                     d_model: int | None = None) -> SAE:
    """A Llama Scope folder: ``hyperparams.json`` + ``checkpoints/final.safetensors``
    (``encoder.weight [d_sae, d]``, ``encoder.bias``, ``decoder.weight [d, d_sae]``,
    ``decoder.bias``)."""
    root = Path(path)
    src = str(root / "hyperparams.json")
    hp = _read_json(root / "hyperparams.json")
    d_in = _int(hp, "d_model", src)
    d_sae = _int(hp, "d_sae", src)
    if d_model is not None and d_in != d_model:
        raise SAEError(src, "d_model", f"the model's d_model {d_model}", str(d_in))
    norms = hp.get("dataset_average_activation_norm")
    avg_in = norms.get("in") if isinstance(norms, dict) else None
    if isinstance(avg_in, bool) or not isinstance(avg_in, (int, float)) or not avg_in > 0:
        raise SAEError(src, "dataset_average_activation_norm.in", "a number > 0",
                       json.dumps(avg_in))
    scale = math.sqrt(d_in) / float(avg_in)
    hook = hp.get("hook_point_in")
    if not isinstance(hook, str):
        raise SAEError(src, "hook_point_in", "a TransformerLens hook name", json.dumps(hook))
    act = hp.get("act_fn", "jumprelu")
    sd = _read_safetensors(root / "checkpoints" / "final.safetensors",
                           {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                            "decoder.weight": (d_in, d_sae), "decoder.bias": (d_in,)})
    params = {"W_enc": sd["encoder.weight"].t().contiguous(), "b_enc": sd["encoder.bias"],
              "W_dec": sd["decoder.weight"].t().contiguous(), "b_dec": sd["decoder.bias"]}
    k = None
    if act == "jumprelu":
        theta = hp.get("jump_relu_threshold")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise SAEError(src, "jump_relu_threshold", "a number", json.dumps(theta))
        params["threshold"] = torch.full((d_sae,), float(theta) * scale)
        arch = "jumprelu"
    elif act == "topk":
        k = _int(hp, "top_k", src, 1, d_sae + 1)
        arch = "topk"
    else:
        raise SAEError(src, "act_fn", "'jumprelu' or 'topk'", json.dumps(act))
    return SAE(architecture=arch, d_in=d_in, d_sae=d_sae, d_out=d_in, hook_name=hook,
               model_name=model_name, params=params,
               preprocessing=Preprocessing(scale=scale, apply_b_dec_to_input=False), k=k,
               source=str(root))


# --------------------------------------------------------------------------- sparsify

_SPARSIFY_HOOK = re.compile(r"(?:model\.)?layers[._](\d+)(?:[._](mlp))?")


def load_sparsify(path: str | os.PathLike[str], *, hook_name: str | None = None,
                  model_name: str = "", d_model: int | None = None) -> SAE:
    """An EleutherAI sparsify hookpoint folder (``cfg.json`` + ``sae.safetensors``).

    The hook point comes from the folder name (``layers.N`` → ``blocks.N.hook_resid_post``,
    ``layers.N.mlp`` → ``blocks.N.hook_mlp_out``) unless ``hook_name`` is given.
    """
    root = Path(path)
    src = str(root / "cfg.json")
    cfg = _read_json(root / "cfg.json")
    d_in = _int(cfg, "d_in", src)
    if d_model is not None and d_in != d_model:
        raise SAEError(src, "d_in", f"the model's d_model {d_model}", str(d_in))
    if cfg.get("num_latents"):
        d_sae = _int(cfg, "num_latents", src)
    else:
        d_sae = d_in * _int(cfg, "expansion_factor", src)
    k = _int(cfg, "k", src, 1, d_sae + 1)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise SAEError(src, "activation", '"topk"', json.dumps(act))
    transcode = bool(cfg.get("transcode", False))
    if hook_name is None:
        m = _SPARSIFY_HOOK.fullmatch(root.name)
        if m is None:
            raise SAEError(str(root), "hook_name", "a folder named layers.N or layers.N.mlp, "
                           "or hook_name given", repr(root.name))
        hook_name = f"blocks.{m.group(1)}.{'hook_mlp_out' if m.group(2) else 'hook_resid_post'}"
    sd = _read_safetensors(root / "sae.safetensors",
                           {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                            "W_dec": (d_sae, d_in), "b_dec": (d_in,)})
    params = {"W_enc": sd["encoder.weight"].t().contiguous(), "b_enc": sd["encoder.bias"],
              "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    return SAE(architecture="topk", d_in=d_in, d_sae=d_sae, d_out=d_in, hook_name=hook_name,
               model_name=model_name, params=params,
               preprocessing=Preprocessing(apply_b_dec_to_input=not transcode), k=k,
               transcoder=transcode, source=str(root))


# --------------------------------------------------------------------------- OpenAI


def convert_openai(state_dict_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   hook_name: str, model_name: str = "") -> Path:
    """Convert an OpenAI ``sparse_autoencoder`` state dict (``.pt``) to an SAELens folder.

    Read with ``torch.load(weights_only=True)`` (no arbitrary unpickling). Their
    ``Autoencoder``: ``LN(x)`` (``(x − μ)/(std + 1e-5)``, unbiased std) when
    ``normalize``, then ``(x − pre_bias)·encoder.weightᵀ + latent_bias``, then ReLU or
    TopK(k) (top-k, then ReLU); decoder ``latents·decoder.weightᵀ + pre_bias``. That is
    SAELens's standard / topk with ``b_dec = pre_bias``, ``apply_b_dec_to_input``.
    ``normalize`` is not in the state dict: the converter assumes the published TopK
    models' convention (normalize on for TopK, off for ReLU) — override by editing
    ``normalize_activations`` in the written cfg.json if yours differs.
    """
    src = str(state_dict_path)
    sd = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise SAEError(src, "$", "a state dict (mapping)", type(sd).__name__)
    for key in ("pre_bias", "latent_bias", "encoder.weight", "decoder.weight"):
        if not isinstance(sd.get(key), torch.Tensor):
            raise SAEError(src, key, "a tensor", type(sd.get(key)).__name__)
    d_sae, d_in = (int(s) for s in sd["encoder.weight"].shape)
    if tuple(sd["decoder.weight"].shape) != (d_in, d_sae):
        raise SAEError(src, "decoder.weight", f"shape {[d_in, d_sae]}",
                       f"{list(sd['decoder.weight'].shape)}")
    act = sd.get("activation", "ReLU")
    k = None
    if act == "TopK":
        state = sd.get("activation_state_dict") or {}
        kt = state.get("k") if isinstance(state, dict) else None
        k = int(kt.item() if isinstance(kt, torch.Tensor) else kt) if kt is not None else None
        if k is None:
            raise SAEError(src, "activation_state_dict.k", "the TopK k", "nothing")
    elif act != "ReLU":
        raise SAEError(src, "activation", "'ReLU' or 'TopK'", repr(act))
    params = {"W_enc": sd["encoder.weight"].float().t().contiguous(),
              "b_enc": sd["latent_bias"].float(),
              "W_dec": sd["decoder.weight"].float().t().contiguous(),
              "b_dec": sd["pre_bias"].float()}
    sae = SAE(architecture="topk" if k else "standard", d_in=d_in, d_sae=d_sae, d_out=d_in,
              hook_name=hook_name, model_name=model_name, params=params,
              preprocessing=Preprocessing(normalize="layer_norm_std" if k else "none",
                                          apply_b_dec_to_input=True), k=k, source=src)
    return save_saelens(sae, out, extra_metadata={"converted_from": "openai"})


# --------------------------------------------------------------------------- auto


def load_sae(path: str | os.PathLike[str], **kwargs: Any) -> SAE:
    """Detect the layout of ``path`` and load it (keyword arguments pass through)."""
    p = Path(path)
    if (p / SAELENS_CFG).is_file() and (p / SAELENS_WEIGHTS).is_file():
        return load_saelens(p, **kwargs)
    if (p / "cfg.json").is_file() and (p / "sae.safetensors").is_file():
        return load_sparsify(p, **kwargs)
    if (p / "hyperparams.json").is_file():
        return load_llama_scope(p, **kwargs)
    if p.suffix == ".npz" or (p / "params.npz").is_file():
        return load_gemma_scope(p, **kwargs)
    raise SAEError(str(p), "$", "an SAELens, sparsify, Llama Scope or Gemma Scope layout "
                   f"(architectures {list(architectures())})", "none of their files")
