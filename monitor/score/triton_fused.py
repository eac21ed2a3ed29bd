"""One Triton kernel for a packed layer's score: GEMM, epilogue and read-out, ``P`` never stored.

For ``x [M, K]`` (``K = d_model``) and a packed layer (``pack.py``: ``W [K, N]``, ``b [N]``,
``θ [N]``, ``R [N, D]``, ``c [D]``; ``N = n_cols``, ``D = n_detectors``) it computes::

    S = sigmoid(epilogue(x · W + b) · R + c)           float32 [M, D]

    epilogue  none: Z = P;  relu: Z = P · [P > 0] (NaN kept, −inf → 0, as ``torch.relu``);
              mask: Z = P · [P > θ]  (the JumpReLU; bit-for-bit the torch scorer's formula)

The general epilogue (gated columns), layer_norm columns and TopK components are not
here: ``Scorer`` keeps the torch path for such layers and says so (``Scorer.kernel_paths``).

Tiling and reduction order. Grid ``(cdiv(M, BLOCK_M), SPLIT)``: program ``(i, s)`` owns rows
``i·BLOCK_M ..`` and the column tiles ``s, s + SPLIT, s + 2·SPLIT, ..`` (``BLOCK_N`` columns
each). It walks its tiles ascending; for each it forms
``P_tile [BLOCK_M, BLOCK_N]`` in float32 registers as ``Σ_k x[:, k-tile] · W[k-tile, n-tile]``
over ``BLOCK_K`` slices of ``d_model``, ascending (``tl.dot`` with a float32 accumulator),
adds ``b``, applies the epilogue, and adds ``Z_tile · R[n-tile, :]`` (``tl.dot``, IEEE
float32) into the program's ``S_acc [BLOCK_M, BLOCK_D]`` float32. ``SPLIT == 1`` (one
launch): after its last tile the program adds ``c``, applies the sigmoid and stores its
``[BLOCK_M, D]`` scores. ``SPLIT > 1``: it stores ``S_acc`` into ``partial [SPLIT, M, D]``
float32 and a second, tiny kernel sums the ``SPLIT`` partials in order ``s = 0, 1, ..``
(deterministic: no atomics), adds ``c`` and applies the sigmoid. The split exists because
few rows make few programs: 1 row is one program walking all of ``W`` on one SM, 4096 rows
at ``BLOCK_M`` 64 are 64 programs on an H100's 132 SMs; :func:`pick_split` splits the
columns until the grid covers the SMs (``P`` cannot be split over ``d_model``: the epilogue
needs the whole sum). Memory traffic: ``x`` once per column tile (from L2), ``W`` and
``R`` once per row tile, ``S`` (or the partials) once; nothing of size ``[M, N]`` exists
anywhere. ``BLOCK_D = max(16, next_pow2(D))`` (``tl.dot`` needs 16);
padded rows / columns / detectors are loaded as 0 and never stored (a padded column has
``P = 0``, ``R = 0``: no contribution).

Dtypes. ``x`` and ``W`` both float32 or both bfloat16 (``x`` is cast to ``W``'s dtype by
:func:`fused_score`); ``b``, ``θ``, ``R``, ``c`` float32; accumulation float32 throughout.
Float32 ``x · W`` uses TF32 tensor cores only when torch's own float32 matmuls do
(``torch.backends.cuda.matmul.allow_tf32``, read per call), so the kernel is compared with
``torch.mm`` at the same precision; otherwise IEEE float32. Under the interpreter a
bfloat16 tile is widened to float32 before ``tl.dot`` (constexpr ``UPCAST``: Triton 3.9's
interpreter multiplies bfloat16 tiles as their raw uint16 bits); a bfloat16 product is exact
in float32, so this is the same math as the GPU's bfloat16 MMA with float32 accumulation.

Differences from the torch scorer: only summation order in float32 (``P`` is summed in
``BLOCK_K`` slices, ``S`` in ``BLOCK_N`` slices); in bfloat16 the torch path rounds ``x · W``
to bfloat16 before ``+ b`` (``torch.mm`` returns bfloat16) while this kernel keeps it in
float32, so the kernel is the closer of the two to the float64 math.

Thread rules: module-level state is only the compiled-kernel cache (``_jitted``; filled
under a lock). :func:`fused_score` allocates its output per call; any number of threads may
call it. Launches go to the current CUDA stream of the calling thread.

Tested on CPU with Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors:
tests/test_triton_fused.py); timed on a GPU by bench/bench_sae_speed.py (``triton`` path).
Imports torch and triton only (no grpc, no other part of the sidecar).
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import torch
import triton
import triton.language as tl

__all__ = ["EPILOGUES", "MAX_DETECTORS", "Blocks", "fused_score", "interpreting",
           "pick_blocks", "pick_split"]

#: Epilogue codes of the kernel (constexpr ``EPILOGUE``).
EPILOGUES: dict[str, int] = {"none": 0, "relu": 1, "mask": 2}
EpilogueName = Literal["none", "relu", "mask"]
#: More detectors on one layer than this: the read-out tile would not fit in registers
#: next to ``P_tile``; the scorer keeps torch for such a layer.
MAX_DETECTORS = 64

Blocks = tuple[int, int, int]  # (BLOCK_M, BLOCK_N, BLOCK_K)


def _fused_score_kernel(x_ptr, w_ptr, b_ptr, theta_ptr, r_ptr, c_ptr, out_ptr,
                        M, N, K, D, SPLIT,
                        stride_xm, stride_xk, stride_wk, stride_wn,
                        stride_rn, stride_rd, stride_os, stride_om, stride_od,
                        FINISH: tl.constexpr, EPILOGUE: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """``out[M, D] = sigmoid(epi(x·W + b) · R + c)`` for rows ``pid·BLOCK_M ..`` (``FINISH``,
    ``SPLIT == 1``), or this program's column tiles' ``epi(x·W + b) · R`` into ``out[pid_s]``
    (``out [SPLIT, M, D]``, the partials; module doc).

    Only long-stable ``tl`` builtins (load/store with masks, dot with an accumulator,
    where, exp, program_id, arange, full; no @jit helpers of triton.language.standard such
    as tl.zeros or tl.sigmoid): the GPU hosts run older Triton releases.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rd = tl.arange(0, BLOCK_D)
    m_ok = rm < M
    d_ok = rd < D
    s_acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    for t in range(pid_s, n_tiles, SPLIT):
        rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong (numpy on the raw uint16)
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        p = acc + tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
        if EPILOGUE == 1:  # relu: 0 where p <= 0, p elsewhere (NaN compares false: kept)
            p = tl.where(p <= 0.0, 0.0, p)
        elif EPILOGUE == 2:  # mask: p · [p > θ], the torch scorer's formula
            th = tl.load(theta_ptr + rn, mask=n_ok, other=0.0)
            p = p * (p > th[None, :]).to(tl.float32)
        r = tl.load(r_ptr + rn[:, None] * stride_rn + rd[None, :] * stride_rd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s_acc = tl.dot(p, r, s_acc, input_precision="ieee")
    if FINISH:
        s = s_acc + tl.load(c_ptr + rd, mask=d_ok, other=0.0)[None, :]
        # sigmoid written out (tl.sigmoid's own formula): tl.sigmoid is a @triton.jit
        # helper, wrapped when triton is imported, so it would not run under an
        # interpreter turned on later (tests turn it on per test)
        s_acc = 1.0 / (1.0 + tl.exp(-s))
    tl.store(out_ptr + pid_s * stride_os + rm[:, None] * stride_om + rd[None, :] * stride_od,
             s_acc, mask=m_ok[:, None] & d_ok[None, :])


def _finish_kernel(part_ptr, c_ptr, out_ptr, M, D, SPLIT,
                   stride_ps, stride_pm, stride_pd, stride_om, stride_od,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[M, D] = sigmoid(Σ_s part[s] + c)``, ``s`` ascending (``part [SPLIT, M, D]``)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    ok = (rm < M)[:, None] & (rd < D)[None, :]
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for i in range(0, SPLIT):
        acc += tl.load(part_ptr + i * stride_ps + rm[:, None] * stride_pm
                       + rd[None, :] * stride_pd, mask=ok, other=0.0)
    s = acc + tl.load(c_ptr + rd, mask=rd < D, other=0.0)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rd[None, :] * stride_od,
             1.0 / (1.0 + tl.exp(-s)), mask=ok)


_jitted: dict[tuple[bool, str], triton.runtime.jit.KernelInterface] = {}
_jit_lock = threading.Lock()


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel(name: Literal["score", "finish"]) -> triton.runtime.jit.KernelInterface:
    """A jitted kernel for the current interpreter setting (``triton.jit`` reads
    ``TRITON_INTERPRET`` when it wraps a function, so each setting gets its own wrap)."""
    key = (interpreting(), name)
    with _jit_lock:
        k = _jitted.get(key)
        if k is None:
            fn = _fused_score_kernel if name == "score" else _finish_kernel
            k = _jitted[key] = triton.jit(fn)
    return k


_sm_counts: dict[int, int] = {}


def _n_sm(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); 4 under the interpreter (so the
    CPU tests exercise the split)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def pick_split(n_rows: int, n_cols: int, blocks: Blocks, n_sm: int) -> int:
    """How many programs share a row tile's columns: enough for the grid to reach ``n_sm``
    programs, at most one column tile each; 1 (one launch) when the row tiles alone fill
    the SMs."""
    m_tiles = triton.cdiv(n_rows, blocks[0])
    n_tiles = triton.cdiv(n_cols, blocks[1])
    return max(1, min(n_tiles, n_sm // max(m_tiles, 1)))


def pick_blocks(n_rows: int, d_model: int, dtype: torch.dtype) -> Blocks:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)`` for a call (a heuristic, not tuned on every GPU).

    Few rows (<= 16): the smallest ``BLOCK_M`` ``tl.dot`` allows (16) so no work is padded,
    and ``BLOCK_N`` 32 so :func:`pick_split` can spread the columns over twice as many
    programs; up to 2048 rows ``BLOCK_M`` 32, more: 64 (``W`` is re-read once per row tile:
    a larger ``BLOCK_M`` reads it less often, the split keeps the grid full). bfloat16
    halves the bytes of a K slice, so it takes ``BLOCK_K`` 64 instead of 32.
    """
    del d_model  # the K loop handles any d_model; kept for a future tuned table
    bm = 16 if n_rows <= 16 else 32 if n_rows <= 2048 else 64
    bn = 32 if n_rows <= 16 else 64
    bk = 64 if dtype == torch.bfloat16 else 32
    return bm, bn, bk


def fused_score(x: torch.Tensor, Wt: torch.Tensor, b: torch.Tensor, theta: torch.Tensor,
                R: torch.Tensor, c: torch.Tensor, epilogue: EpilogueName,
                blocks: Blocks | None = None, split: int | None = None) -> torch.Tensor:
    """``sigmoid(epilogue(x · Wt.T + b) · R + c)``: float32 ``[n_rows, D]``, a new tensor.

    ``x [n_rows, d_model]`` (any strides; cast to ``Wt``'s dtype when it differs),
    ``Wt [n_cols, d_model]`` float32 or bfloat16 (the scorer's ``F.linear`` layout; any
    strides), ``b``, ``theta [n_cols]`` float32 contiguous, ``R [n_cols, D]`` float32
    (``D <= MAX_DETECTORS``), ``c [D]`` float32 contiguous; all on one device: CUDA, or
    CPU under the interpreter. ``blocks``: ``(BLOCK_M, BLOCK_N, BLOCK_K)``, powers of two
    >= 16 (default :func:`pick_blocks`); ``split``: programs per row tile (default
    :func:`pick_split`; 1 = one launch, more = a second small launch that sums them).
    Every shape and dtype is checked before the launch (ValueError naming the argument,
    expected and found).
    """
    n_rows, d_model = _shape2(x, "x")
    n_cols, k_w = _shape2(Wt, "Wt")
    n_r, D = _shape2(R, "R")
    if k_w != d_model:
        raise ValueError(f"Wt: expected [n_cols, {d_model}] (x's d_model), found "
                         f"{list(Wt.shape)}")
    if n_r != n_cols:
        raise ValueError(f"R: expected [{n_cols}, n_detectors], found {list(R.shape)}")
    if not 1 <= D <= MAX_DETECTORS:
        raise ValueError(f"R: expected 1..{MAX_DETECTORS} detectors, found {D}")
    for name, t, n in (("b", b, n_cols), ("theta", theta, n_cols), ("c", c, D)):
        if t.shape != (n,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name}: expected float32 contiguous [{n}], found "
                             f"{t.dtype} {list(t.shape)}")
    if R.dtype != torch.float32:
        raise ValueError(f"R: expected float32, found {R.dtype}")
    if Wt.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"Wt: expected float32 or bfloat16, found {Wt.dtype}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: expected one of {list(EPILOGUES)}, found {epilogue!r}")
    dev = Wt.device
    if dev.type != "cuda" and not interpreting():
        raise ValueError(f"Wt: expected a CUDA tensor (or TRITON_INTERPRET=1), found {dev}")
    for name, t in (("x", x), ("b", b), ("theta", theta), ("R", R), ("c", c)):
        if t.device != dev:
            raise ValueError(f"{name}: expected device {dev} (Wt's), found {t.device}")
    bm, bn, bk = blocks or pick_blocks(n_rows, d_model, Wt.dtype)
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"blocks: {name} must be a power of two >= 16, found {v}")
    out = torch.empty(n_rows, D, dtype=torch.float32, device=dev)
    if n_rows == 0:
        return out
    n_split = split if split is not None else pick_split(n_rows, n_cols, (bm, bn, bk),
                                                         _n_sm(dev))
    if not 1 <= n_split <= triton.cdiv(n_cols, bn):
        raise ValueError(f"split: expected 1..{triton.cdiv(n_cols, bn)} (column tiles of "
                         f"{bn}), found {n_split}")
    if x.dtype != Wt.dtype:
        x = x.to(Wt.dtype)
    tf32 = Wt.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    upcast = interpreting() and Wt.dtype == torch.bfloat16
    block_d = max(16, triton.next_power_of_2(D))
    m_tiles = triton.cdiv(n_rows, bm)
    # SPLIT == 1: the scores straight into out; else the partials [n_split, n_rows, D]
    dst = out if n_split == 1 else torch.empty(n_split, n_rows, D, dtype=torch.float32,
                                               device=dev)
    dst3 = dst.unsqueeze(0) if n_split == 1 else dst
    _kernel("score")[(m_tiles, n_split)](
        x, Wt, b, theta, R, c, dst3,
        n_rows, n_cols, d_model, D, n_split,
        x.stride(0), x.stride(1), Wt.stride(1), Wt.stride(0),
        R.stride(0), R.stride(1), dst3.stride(0), dst3.stride(1), dst3.stride(2),
        FINISH=n_split == 1, EPILOGUE=EPILOGUES[epilogue],
        PRECISION="tf32" if tf32 else "ieee",
        UPCAST=upcast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=block_d)
    if n_split > 1:
        fm = 64
        _kernel("finish")[(triton.cdiv(n_rows, fm),)](
            dst, c, out, n_rows, D, n_split,
            dst.stride(0), dst.stride(1), dst.stride(2), out.stride(0), out.stride(1),
            BLOCK_M=fm, BLOCK_D=block_d)
    return out


def _shape2(t: torch.Tensor, name: str) -> tuple[int, int]:
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d tensor, found shape {list(t.shape)}")
    return int(t.shape[0]), int(t.shape[1])
