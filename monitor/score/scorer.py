"""The fused scorer: one GEMM per hook point, a vectorised epilogue, a small read-out GEMM.

Kernels are keyed by hook point name (``blocks.L.hook_<kind>``, ``monitor.wire.hooks``);
every method taking ``layer`` also takes a bare int ``L``, meaning
``blocks.L.hook_resid_post``. For ``x [n_rows, d_model]`` read at that hook point (see
``pack.py`` for how W, b, θ are built)::

    P = x · W + b                          one torch.addmm (bf16: mm, then + b in fp32)
    P[:, ln] = (x · W)[:, ln] · rsqrt(var(x) + ln_eps) + b[ln]   only if the layer has them
    (layer_norm_std columns: · 1 / (sqrt(var(x)·d/(d−1)) + ln_eps) instead)
    Z = P · [P > θ]                        identity θ = −inf, relu 0, jumprelu θ
    Z = [P > θ] · max(s·P + t, floor)      instead, if the layer has gated columns
    S = sigmoid(Z · R + c)                 float32 [n_rows, n_detectors]  (addmm, R^T kept)

Per-call cost (CPU; measured in bench/RESULTS.md, "## Scorer vs bare GEMM"): every step
after the GEMM works in place on the GEMM's own output ``P``, and the epilogue is chosen
once per layer at construction (``_Kernel.epilogue``):

* ``none``   every θ is −inf (probes only): ``Z = P``, nothing to do;
* ``relu``   every θ is 0: ``P.relu_()`` (equal to ``P · [P > 0]``; NaN stays NaN);
* ``mask``   per-column θ: ``M = gt(P, θ)`` written straight into a float32 buffer
  (a bool mask plus a cast measured ~5× slower: 2.3 ms vs 0.46 ms at 4096 × 513), then
  ``P *= M`` — bit-for-bit the ``P · [P > θ]`` of the formula;
* ``general`` gated columns (and layer_norm columns): the general formulas above.

The read-out is one addmm into a fresh ``[n_rows, n_detectors]`` tensor, sigmoid in place.
On a layer whose epilogue is ``none`` the read-out is linear too, so :meth:`Scorer.score`
folds it into the GEMM at construction: ``S = sigmoid(x · (W·R) + (b·R + c))``, one addmm
of ``n_detectors`` columns (the columns ``Z`` are not formed; ``score_and_columns`` still
forms them, and its scores equal the folded ones to float32 rounding, ~1e-7).
Input checks are O(1) (dtype, shape); a hook point given as a name or a bare layer is
looked up in one dict of both spellings, built at construction.

Devices and kernels. ``Scorer(bundle, device="cuda")`` keeps every kernel tensor on that
device and scores tensors there (numpy / CPU inputs are copied to it; scores come back as
numpy, a ``[n_rows, n_detectors]`` copy). ``kernel="triton"`` scores a ``relu`` / ``mask``
layer's :meth:`Scorer.score` with one Triton kernel (``monitor/score/triton_fused.py``:
GEMM, epilogue and read-out fused, ``P`` never stored); it needs CUDA (or Triton's CPU
interpreter, ``TRITON_INTERPRET=1``, for tests). Every other layer keeps the torch path
with the reason in :attr:`Scorer.kernel_paths` (logged once at construction): ``none``
layers (the folded read-out above is already one GEMM of ``n_detectors`` columns),
``general`` (gated / layer_norm) and TopK layers, more than ``MAX_DETECTORS`` detectors,
no CUDA, no triton. The torch path is the reference and the default.
``score_components``, ``score_and_columns`` and the projected entry points always use torch
(they return ``Z``).

Thread rules: a Scorer is immutable after construction. ``score`` and every other method
allocate their own outputs and scratch per call (no buffer is cached or shared between
calls: fresh vs reused output buffers measured within 1 % of the GEMM at 64–4096 rows), so
any number of threads may score at once, and the arrays returned are the caller's to
keep. It sets no global torch state (threads, dtypes).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from monitor.wire.hooks import hook_key

from .bundle import Bundle
from .pack import PackedLayer, TopKBlock, pack_layer

__all__ = ["INPUT_DTYPES", "KERNELS", "Scorer"]

log = logging.getLogger(__name__)

#: Activation dtypes accepted by :meth:`Scorer.score`.
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16)

Epilogue = Literal["none", "relu", "mask", "general"]
KernelChoice = Literal["torch", "triton"]
#: ``kernel=`` choices of :class:`Scorer` (module doc, "Devices and kernels").
KERNELS: tuple[KernelChoice, ...] = ("torch", "triton")


@dataclass(frozen=True, eq=False)
class _Kernel:
    """What one layer's score needs, precomputed. Tensors are never written after init.

    ``Wt [n_cols, d_model]`` (W transposed, contiguous) in the compute dtype: the GEMM
    reads it as ``WtT = Wt.t()`` (kept as a view), the ``F.linear`` layout, which oneDNN's
    bf16 kernels need to be fast on CPU (row-major ``[d_model, n_cols]`` bf16 measured ~5×
    slower). ``b_gemm [n_cols]`` (fp32 compute: b with layer_norm columns zeroed, added
    inside addmm; bf16: None); ``b_post [n_cols]`` float32, added after the GEMM (bf16: all
    of b; fp32: b on layer_norm columns only, None if there are none); ``ln_eps [1,
    n_cols]`` (None without layer_norm columns); ``ln_cols [n_cols]`` bool. ``Rt
    [n_detectors, n_cols]``: the read-out ``R`` transposed, contiguous, read as ``RtT =
    Rt.t()`` (a skinny ``[rows, n_cols] × [n_cols, D]`` addmm with row-major ``R``
    measured ~5× slower on CPU: 7.5 vs 1.4 ms at 4096 × 520 × 9). ``epilogue``: which
    epilogue the layer needs (module doc). Every tensor here is on the scorer's device
    except ``packed`` (CPU, the public copy); ``dev`` is ``packed`` on the device (the
    same object on CPU).
    """

    packed: PackedLayer
    dev: PackedLayer
    Wt: torch.Tensor
    WtT: torch.Tensor
    b_gemm: torch.Tensor | None
    b_post: torch.Tensor | None
    ln_cols: torch.Tensor | None
    ln_eps: torch.Tensor | None
    Rt: torch.Tensor
    RtT: torch.Tensor
    epilogue: Epilogue
    #: epilogue ``none`` (and no TopK): the read-out folded into the GEMM, ``(WRt
    #: [n_detectors, d_model]`` compute dtype, ``cR [n_detectors]`` float32): ``S =
    #: sigmoid(x · WRt.t() + cR)``; None otherwise
    fold: tuple[torch.Tensor, torch.Tensor] | None
    #: TopK components: ``(Wt_full [m, d_model]`` compute dtype, ``block)`` (pack.TopKBlock)
    topk: tuple[tuple[torch.Tensor, TopKBlock], ...] = ()
    #: "triton" when :meth:`Scorer.score` runs the fused Triton kernel, else "torch: <why>"
    path: str = "torch"


def _epilogue(p: PackedLayer) -> Epilogue:
    if p.mag_scale is not None or p.ln_cols is not None:
        return "general"
    if bool(torch.isneginf(p.theta).all()):
        return "none"
    if bool((p.theta == 0).all()):
        return "relu"
    return "mask"


class Scorer:
    """Scores activation rows of a bundle's layers with the packed fused kernel.

    ``compute_dtype`` is the GEMM dtype: float32 (default) or bfloat16 (keeps a bf16 copy
    of W; the GEMM result is upcast to float32 before bias, epilogue and read-out).
    ``device``: where the kernels run (default CPU); ``kernel``: ``torch`` (default) or
    ``triton`` (module doc, "Devices and kernels"; :attr:`kernel_paths` says which layer
    got which).
    """

    def __init__(self, bundle: Bundle, compute_dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", kernel: KernelChoice = "torch") -> None:
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, "
                             f"got {compute_dtype}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.bundle = bundle
        self.compute_dtype = compute_dtype
        self.device = torch.device(device)
        self.kernel = kernel
        self._no_triton = _triton_unusable(self.device) if kernel == "triton" else None
        self.d_model = bundle.d_model
        #: hook points with a detector, forward order; ``layers``: their layers, ascending
        self.hooks: tuple[str, ...] = bundle.hook_names
        self.layers: tuple[int, ...] = bundle.layers
        self._kernels: dict[str, _Kernel] = {
            hook: self._build(pack_layer(bundle, hook)) for hook in self.hooks
        }
        # every spelling a caller may use for a kernel, so a call costs one dict lookup:
        # the hook name, and the bare layer int for blocks.L.hook_resid_post
        self._by_key: dict[int | str, _Kernel] = {}
        for hook, kern in self._kernels.items():
            self._by_key[hook] = kern
            if hook == hook_key(kern.packed.layer):
                self._by_key[kern.packed.layer] = kern
        #: hook point -> "triton" or "torch: <why not triton>" (what :meth:`score` runs)
        self.kernel_paths: dict[str, str] = {h: k.path for h, k in self._kernels.items()}
        if kernel != "torch":
            log.info("scorer kernels (%s, %s): %s", self.device, compute_dtype,
                     "; ".join(f"{h}: {p}" for h, p in self.kernel_paths.items()))

    def _path(self, p: PackedLayer, epilogue: Epilogue) -> str:
        """``"triton"`` or ``"torch: <why>"`` for layer ``p`` (module doc)."""
        if self.kernel == "torch":
            return "torch"
        if self._no_triton is not None:
            return f"torch: {self._no_triton}"
        if p.topk:
            return "torch: TopK component (row top-k mask; triton covers relu/mask layers)"
        if epilogue == "none":
            return "torch: epilogue none (read-out folded into one GEMM of n_detectors columns)"
        if epilogue == "general":
            return ("torch: gated or layer_norm columns (general epilogue; triton covers "
                    "relu/mask layers)")
        from .triton_fused import MAX_DETECTORS
        if p.R.shape[1] > MAX_DETECTORS:
            return f"torch: {p.R.shape[1]} detectors (triton kernel: at most {MAX_DETECTORS})"
        return "triton"

    def _build(self, p: PackedLayer) -> _Kernel:
        dev = self.device
        epilogue = _epilogue(p)
        path = self._path(p, epilogue)
        on_dev = p if dev.type == "cpu" else _packed_to(p, dev)
        ln = on_dev.ln_cols
        fp32 = self.compute_dtype == torch.float32
        b = on_dev.b
        if ln is None:
            b_gemm, b_post = (b, None) if fp32 else (None, b)
        elif fp32:
            b_gemm, b_post = b.masked_fill(ln, 0.0), b.masked_fill(~ln, 0.0)
        else:
            b_gemm, b_post = None, b
        Wt = p.W.t().to(dev, self.compute_dtype).contiguous()
        Rt = on_dev.R.t().contiguous()
        fold = None
        if epilogue == "none" and not p.topk:  # Z = P: S = sigmoid((x·W + b)·R + c)
            R = p.R.double()
            WRt = (p.W.double() @ R).t().to(dev, self.compute_dtype).contiguous()
            fold = (WRt, (p.b.double() @ R + p.c.double()).float().to(dev))
        return _Kernel(
            packed=p,
            dev=on_dev,
            Wt=Wt,
            WtT=Wt.t(),
            b_gemm=b_gemm,
            b_post=b_post,
            ln_cols=ln,
            ln_eps=None if on_dev.ln_eps is None else on_dev.ln_eps.unsqueeze(0),
            Rt=Rt,
            RtT=Rt.t(),
            epilogue=epilogue,
            fold=fold,
            topk=tuple((blk.W.t().to(dev, self.compute_dtype).contiguous(), blk)
                       for blk in on_dev.topk),
            path=path,
        )

    # ----------------------------------------------------------------------- public

    def packed(self, layer: int | str) -> PackedLayer:
        """The float32 packed weights of ``layer`` (read-only)."""
        return self._kernel(layer).packed

    def detectors_on(self, layer: int | str) -> tuple[str, ...]:
        """Detector names of ``layer``, in the column order of :meth:`score`."""
        return self._kernel(layer).packed.detectors

    def score_components(self, layer: int | str, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Column values ``Z`` after the epilogue: float32 ``[n_rows, n_cols]``.

        Column ``j`` is ``packed(layer).columns[j]``. ``x`` is not modified.
        """
        return self._columns(self._kernel(layer), x)

    def projection(self, layer: int | str) -> tuple[torch.Tensor, bool]:
        """What a worker needs to project rows itself (in-worker projection, docs/CAPTURE.md):
        ``(W, needs_var)``. ``W`` float32 ``[d_model, n_cols]`` (read-only; the packed
        matrix, layer_norm columns already centred). ``needs_var``: the layer has
        layer_norm columns, so the worker also sends each row's population variance
        ``var(x)``. Every packed layer is projectable: each kind is affine before a
        per-column epilogue, except TopK (its row mask needs the full-width GEMM of ``x``):
        a layer with a TopK component raises ValueError (score it from ``x``)."""
        kern = self._kernel(layer)
        if kern.topk:
            raise ValueError(f"{kern.packed.hook_name}: a TopK component needs x (its "
                             "full-width block), not a projection")
        return kern.packed.W, kern.ln_cols is not None

    def score_projected(self, layer: int | str, xw: torch.Tensor,
                        var: torch.Tensor | None = None) -> np.ndarray:
        """:meth:`score` from a worker's projection: ``xw = x · W`` float32 / bf16
        ``[n_rows, n_cols]`` (``W`` from :meth:`projection`, no bias) and, when
        ``needs_var``, ``var`` ``[n_rows]`` = ``var(x, correction=0)``. Equals ``score(layer,
        x)`` up to the GEMM's rounding (tests/test_scorer.py)."""
        return self.projected_and_columns(layer, xw, var)[0]

    def projected_and_columns(self, layer: int | str, xw: torch.Tensor,
                              var: torch.Tensor | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score_and_columns` from a worker's projection (arguments as
        :meth:`score_projected`): float32 ``[n_rows, n_detectors]`` scores and
        ``[n_rows, n_cols]`` column values."""
        kern = self._kernel(layer)
        if kern.topk:
            raise ValueError(f"{kern.packed.hook_name}: a TopK component needs x (its "
                             "full-width block), not a projection")
        n_cols = kern.packed.n_cols
        if xw.ndim != 2 or xw.shape[1] != n_cols:
            raise ValueError(f"xw must have shape [n_rows, {n_cols}], got {list(xw.shape)}")
        if xw.dtype not in INPUT_DTYPES:
            raise ValueError(f"xw dtype must be one of {INPUT_DTYPES}, got {xw.dtype}")
        if kern.ln_cols is not None:
            if var is None or var.shape != (xw.shape[0],):
                raise ValueError(f"var: expected [{xw.shape[0]}] (the layer has layer_norm "
                                 f"columns), found {None if var is None else list(var.shape)}")
            var = var.to(self.device, torch.float32).unsqueeze(1)
        p = xw.to(self.device, torch.float32)
        if p is xw:
            p = xw.clone()
        if kern.b_gemm is not None:
            p.add_(kern.b_gemm)
        z = self._finish(kern, p, var)
        return _host(self._readout(kern, z)), _host(z)

    def score(self, layer: int | str, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Detector scores in [0, 1]: float32 ``[n_rows, len(detectors_on(layer))]``.

        ``x``: ``[n_rows, d_model]`` float32 / float16 / bfloat16 tensor, or a float32 /
        float16 numpy array (e.g. a zero-copy view of wire bytes, viewed as a tensor
        without a copy; it is not modified). ``n_rows`` may be 0.
        """
        kern = self._kernel(layer)
        if kern.path == "triton":  # GEMM, epilogue, read-out in one kernel (module doc)
            from .triton_fused import fused_score
            assert kern.epilogue in ("relu", "mask")
            return _host(fused_score(self._input(x), kern.Wt, kern.dev.b, kern.dev.theta,
                                     kern.RtT, kern.dev.c, kern.epilogue))
        if kern.fold is None:
            return _host(self._readout(kern, self._columns(kern, x)))
        WRt, cR = kern.fold  # read-out folded into the GEMM (module doc)
        xc = self._input(x)
        if self.compute_dtype == torch.float32:
            s = torch.addmm(cR, xc, WRt.t())
        else:
            s = torch.mm(xc, WRt.t()).float().add_(cR)
        return _host(s.sigmoid_())

    def score_and_columns(self, layer: int | str, x: torch.Tensor | np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
        """``(score(layer, x), score_components(layer, x))`` as float32 numpy arrays
        ``[n_rows, n_detectors]``, ``[n_rows, n_cols]``, from one GEMM (the column
        values feed the fired-latent report, ``monitor.judge.latents``)."""
        kern = self._kernel(layer)
        z = self._columns(kern, x)
        return _host(self._readout(kern, z)), _host(z)

    # ----------------------------------------------------------------------- kernels

    def _columns(self, kern: _Kernel, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``Z`` float32 ``[n_rows, n_cols]`` of ``x`` (checked here), a new tensor."""
        xc = self._input(x)
        if xc.shape[0] == 0:
            return torch.zeros(0, kern.packed.n_cols, device=self.device)
        if kern.b_gemm is not None:
            p = torch.addmm(kern.b_gemm, xc, kern.WtT)
        else:
            p = torch.mm(xc, kern.WtT).float()
        var = None
        if kern.ln_cols is not None:
            xf = _as_tensor(x).to(self.device, torch.float32)  # not xc: var unrounded
            var = torch.var(xf, dim=1, correction=0, keepdim=True)  # [n_rows, 1]
        z = self._finish(kern, p, var)
        for Wt_full, blk in kern.topk:  # full-width TopK: keep a row's k largest latents
            r = torch.mm(xc, Wt_full.t()).float().add_(blk.b)  # [n_rows, m] rank values
            # the k indices torch.topk returns, not r >= τ: bf16 rank values tie at τ often
            # and a threshold would admit every tied latent (sae/topk.py: exactly k)
            top = r.topk(blk.k, dim=1, sorted=False).indices  # [n_rows, k]
            keep = torch.zeros(r.shape, dtype=torch.bool, device=r.device)
            keep.scatter_(1, top, True)  # [n_rows, m], exactly k True per row
            z[:, blk.cols] *= keep[:, blk.ids].to(z.dtype)
        return z

    def _finish(self, kern: _Kernel, p: torch.Tensor, var: torch.Tensor | None
                ) -> torch.Tensor:
        """Everything after the GEMM: layer-norm factor (``var [n_rows, 1]``, given iff the
        layer has layer_norm columns), post-GEMM bias, epilogue. ``p`` (float32, this
        call's own) is overwritten; the result may be ``p`` itself."""
        pk = kern.dev
        if kern.b_post is not None and kern.ln_cols is None:
            p.add_(kern.b_post)  # bf16 compute: the whole bias after the GEMM
        epi = kern.epilogue
        if epi == "none":
            return p
        if epi == "relu":
            return p.relu_()
        if epi == "mask":
            # gt written into a float32 buffer: 1.0 / 0.0, no bool tensor and cast
            return p.mul_(torch.gt(p, pk.theta, out=torch.empty_like(p)))
        if kern.ln_cols is not None:
            assert kern.ln_eps is not None and var is not None
            inv = torch.rsqrt(var + kern.ln_eps)  # [n_rows, n_cols]
            if pk.ln_std is not None:
                d = self.d_model
                std = torch.sqrt(var * (d / max(d - 1, 1)))
                inv = torch.where(pk.ln_std, 1.0 / (std + kern.ln_eps), inv)
            p = torch.where(kern.ln_cols, p * inv, p)
            if kern.b_post is not None:
                p.add_(kern.b_post)
        if pk.mag_scale is not None:
            assert pk.mag_shift is not None and pk.floor is not None
            mag = torch.maximum(p * pk.mag_scale + pk.mag_shift, pk.floor)
            return torch.where(p > pk.theta, mag, 0.0)
        return p.mul_(torch.gt(p, pk.theta, out=torch.empty_like(p)))

    @staticmethod
    def _readout(kern: _Kernel, z: torch.Tensor) -> torch.Tensor:
        """``sigmoid(Z · R + c)`` float32 ``[n_rows, n_detectors]``, a new tensor."""
        return torch.addmm(kern.dev.c, z, kern.RtT).sigmoid_()

    # ----------------------------------------------------------------------- helpers

    def _kernel(self, layer: int | str) -> _Kernel:
        kern = self._by_key.get(layer)
        if kern is not None:
            return kern
        hook = hook_key(layer)  # another spelling, or no such hook point
        try:
            return self._kernels[hook]
        except KeyError:
            raise KeyError(f"{hook} has no detectors in bundle {self.bundle.name!r} "
                           f"(hook points {list(self.hooks)})") from None

    def _input(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``x`` checked (O(1): type, dtype, shape), on the scorer's device and in the
        compute dtype (no copy when it already is)."""
        t = _as_tensor(x)
        self._check_input(t)
        return t.to(self.device, self.compute_dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in INPUT_DTYPES:
            raise ValueError(f"x dtype must be one of {INPUT_DTYPES}, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape [n_rows, {self.d_model}], "
                             f"got {list(x.shape)}")


def _host(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array: a view on CPU, a copy from any other device."""
    return t.numpy() if t.device.type == "cpu" else t.cpu().numpy()


def _packed_to(p: PackedLayer, device: torch.device) -> PackedLayer:
    """``p`` with every tensor (TopK blocks included) on ``device``."""
    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    topk = tuple(replace(t, W=t.W.to(device), b=t.b.to(device), ids=t.ids.to(device))
                 for t in p.topk)
    return replace(p, W=p.W.to(device), b=p.b.to(device), theta=p.theta.to(device),
                   R=p.R.to(device), c=p.c.to(device), ln_cols=to(p.ln_cols),
                   ln_eps=to(p.ln_eps), ln_std=to(p.ln_std), mag_scale=to(p.mag_scale),
                   mag_shift=to(p.mag_shift), floor=to(p.floor), topk=topk)


def _triton_unusable(device: torch.device) -> str | None:
    """Why ``kernel="triton"`` cannot run on ``device`` here, or None when it can."""
    try:
        from . import triton_fused
    except ImportError as e:  # triton not installed (or too old for the kernel)
        return f"triton not importable ({e})"
    if device.type == "cuda" or (device.type == "cpu" and triton_fused.interpreting()):
        return None
    return f"triton runs on CUDA (or on CPU with TRITON_INTERPRET=1), not on {device}"


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor sharing its memory (read-only arrays: never written)."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def _consume_readonly_warning() -> None:
    """torch warns once per process (a C++ warn-once) that the tensor of a read-only numpy
    array is writable; the scorer only reads such arrays (wire frames). The one warning is
    raised and dropped here, at import (under the import lock), so that scoring never
    touches the process-global warnings filters from its threads (``catch_warnings`` is
    not thread-safe and cost ~2 µs a call)."""
    a = np.zeros(1, dtype=np.float32)
    a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(a)


_consume_readonly_warning()
