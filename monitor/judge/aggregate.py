"""Streaming aggregators of per-token scores, vectorised over chunks.

An aggregator sees the scores ``s_1, s_2, ...`` of one request and detector (tokens in
scope, in position order) in chunks of any size. ``update(chunk)`` returns the running
aggregate ``a_t`` after EVERY token of the chunk (float64, same length), so the tracker
can find the first token where a threshold is crossed. Results do not depend on how the
stream is chunked: each aggregator performs the same floating-point operations in the
same order as the per-token definition (tests compare bit-for-bit-close against a naive
Python loop over random chunkings).

- :class:`MaxAggregator`       ``a_t = max_{i<=t} s_i``            (``np.maximum.accumulate``)
- :class:`MeanAggregator`      ``a_t = (Σ_{i<=t} s_i) / t``        (``np.cumsum``, sequential)
- :class:`MeanLogitAggregator` ``a_t = σ((1/t) Σ_{i<=t} logit(clip(s_i, ε, 1-ε)) − a·log t)``,
  ``ε = LOGIT_EPS`` (the mean of the probe's logits: for a linear probe it is the logit
  of the mean activation, the statistic a pooled probe is trained on), ``a`` the
  ``length_slope`` (default 0: no length term; a length-debiased probe subtracts the
  drift of its benign training scores with ``log`` of the in-scope token count);
  ``skip_tokens = k`` (default 0) leaves the first ``k`` scores out of the mean and the
  count once more than ``k`` were seen
- :class:`EmaAggregator`       ``a_1 = s_1``; ``a_t = α a_{t-1} + (1-α) s_t``,
  ``α = 0.5**(1/h)``                                               (``scipy.signal.lfilter``)
- :class:`WindowMaxAggregator` ``a_t = max_{t-N < i <= t} s_i``    (van Herk/Gil-Werman)
- :class:`WindowMeanLogitAggregator` ``a_t = σ((1/k) Σ_{t-k < i <= t} logit(clip(s_i, ε, 1-ε)))``,
  ``k = min(t, N)``: the mean logit of the last ``N`` scores (the mean so far while
  ``t < N``); with the tracker's "reached at the first judged ``t ≥ min_tokens``" rule it
  alerts on ``max_t a_t``: a short stretch of hot tokens that a mean over the whole
  request dilutes (``probes.window``)
- :class:`SoftmaxLogitAggregator` ``a_t = σ(Σ_{i<=t} w_i ℓ_i / Σ_{i<=t} w_i − a·log t)``,
  ``w_i = e^{ℓ_i/τ}``, ``ℓ_i = logit(clip(s_i, ε, 1-ε))``, ``τ = temperature``: the
  softmax-pooled logit of a softmax probe (``probes.token_pool``; ``τ → ∞`` is
  ``mean_logit``, ``τ → 0`` the running max of ``ℓ``): the request's hottest tokens get
  more say than in the mean

No per-token Python loops: each chunk costs a few numpy calls, O(chunk) work (window_max:
O(chunk + N); window_mean_logit: N vector adds of the chunk's length, O(chunk·N), so its
``N`` is capped lower, :data:`MAX_MEAN_WINDOW_TOKENS`). State per aggregator is O(1),
except the window kinds, which keep the last ``N - 1`` scores (or logits).

When a detector is judged (policy ``judge_at``) is defined here too, once, for the
tracker and the probe toolkit: :func:`span_end_rows` (``every_token``: every token in
scope; ``span_end``: the last token of each run of consecutive in-scope rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.signal import lfilter

__all__ = [
    "AGGREGATIONS",
    "AGGREGATION_KINDS",
    "LOGIT_EPS",
    "MAX_MEAN_WINDOW_TOKENS",
    "MAX_SKIP_TOKENS",
    "MAX_TEMPERATURE",
    "MAX_WINDOW_TOKENS",
    "MIN_TEMPERATURE",
    "AggParam",
    "Aggregation",
    "AggregationKind",
    "Aggregator",
    "EmaAggregator",
    "MaxAggregator",
    "MeanAggregator",
    "MeanLogitAggregator",
    "SoftmaxLogitAggregator",
    "WindowMaxAggregator",
    "WindowMeanLogitAggregator",
    "make_aggregator",
    "param_owner",
    "span_end_rows",
]

#: Scores are clipped to ``[LOGIT_EPS, 1 - LOGIT_EPS]`` before ``logit`` in ``mean_logit``:
#: a float32 sigmoid rounds to exactly 1.0 from ``z ≈ 16.6`` on, so ``logit`` of a served
#: score is only trustworthy within ``±log((1-ε)/ε) = ±13.8`` (and must stay finite).
LOGIT_EPS = 1e-6

#: Upper bound on ``window_tokens``: the tracker keeps ``window_tokens - 1`` floats per
#: live request and detector, so the bound caps memory (8 bytes x 65535 x requests).
MAX_WINDOW_TOKENS = 65536

#: Upper bound on ``window_tokens`` of ``window_mean_logit``: a chunk of ``m`` scores costs
#: ``N`` vector adds of length ``m`` (each window summed in one fixed order, so chunking
#: cannot change a bit), and the tracker keeps ``N - 1`` floats per request and detector.
MAX_MEAN_WINDOW_TOKENS = 1024

#: Upper bound on ``skip_tokens`` of ``mean_logit`` (the first words of a request left out
#: of the mean; the shipped probe skips 4; a larger value would leave most short requests
#: judged on a handful of tokens).
MAX_SKIP_TOKENS = 64

#: Bounds on ``temperature`` (``τ``) of ``softmax_logit``. With ``|ℓ| <= log((1-ε)/ε) =
#: 13.82`` and ``τ >= 0.25``, ``|ℓ/τ| <= 55.3``: ``e^{ℓ/τ}`` lies in ``[1e-24, 1e24]``, so
#: the running sums need no max shift in float64 (no overflow before ``~1e284`` tokens,
#: no underflow). ``τ = 1e6`` is ``mean_logit`` to ~1e-5 in the logit.
MIN_TEMPERATURE = 0.25
MAX_TEMPERATURE = 1e6


class Aggregator(Protocol):
    """Running aggregate over a stream of scores fed in chunks."""

    #: Number of scores seen so far.
    n: int

    @property
    def value(self) -> float:
        """The aggregate after the last score seen (0.0 before any score)."""
        ...

    def update(self, scores: np.ndarray) -> np.ndarray:
        """Feed a chunk (1-D, any float dtype); return ``a_t`` after each score (float64)."""
        ...

    def push(self, score: float) -> float:
        """Feed one score; return ``a_t``. Same arithmetic as :meth:`update` (the decode
        fast path: one token per request per step, without numpy call overhead)."""
        ...


def _as_chunk(scores: np.ndarray) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"scores must be 1-D; got shape {x.shape}")
    return x


def _carried_cumsum(carried: float, x: np.ndarray) -> np.ndarray:
    """``S_j = carried + x_1 + ... + x_j`` for each ``j`` (float64, ``x``'s length): one
    ``np.cumsum`` over ``[carried, x...]``, left to right, so the partial sums are the
    per-token loop's ``S += x_j`` bit for bit, whatever the chunking."""
    return np.cumsum(np.concatenate(([carried], x)))[1:]


class MaxAggregator:
    """``a_t = max(a_{t-1}, s_t)``, i.e. the maximum of all scores so far."""

    def __init__(self) -> None:
        self.n = 0
        self._m = -np.inf

    @property
    def value(self) -> float:
        return float(self._m) if self.n else 0.0

    def push(self, score: float) -> float:
        s = float(score)
        if not s <= self._m:  # also when s is NaN, as np.maximum would propagate it
            self._m = s
        self.n += 1
        return float(self._m)

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_chunk(scores)
        if x.size == 0:
            return x.copy()
        out = np.maximum.accumulate(x)
        np.maximum(out, self._m, out=out)
        self._m = out[-1]
        self.n += x.size
        return out


class MeanAggregator:
    """``a_t = S_t / t`` with ``S_t = S_{t-1} + s_t`` summed sequentially in float64.

    The chunk is prefixed with the carried sum ``S`` before ``np.cumsum`` (which
    accumulates left to right), so every partial sum is computed exactly as the
    per-token loop would: chunking cannot change a bit of the result.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sum = 0.0

    @property
    def value(self) -> float:
        return self._sum / self.n if self.n else 0.0

    def push(self, score: float) -> float:
        self._sum += float(score)
        self.n += 1
        return self._sum / self.n

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_chunk(scores)
        if x.size == 0:
            return x.copy()
        sums = _carried_cumsum(self._sum, x)
        counts = np.arange(self.n + 1, self.n + 1 + x.size, dtype=np.float64)
        self._sum = float(sums[-1])
        self.n += x.size
        return sums / counts


class EmaAggregator:
    """Exponential moving average with a half-life in tokens.

    ``a_1 = s_1`` and ``a_t = α a_{t-1} + (1-α) s_t`` with ``α = 0.5**(1/h)``: the weight
    of a score halves every ``h`` tokens. This is the IIR filter ``b = [1-α]``,
    ``a = [1, -α]``; ``scipy.signal.lfilter`` with initial state ``zi = [α a_{t-1}]``
    evaluates it exactly over a chunk (transposed direct form II: ``y = b0 x + z``,
    ``z = α y``), so chunk boundaries are invisible. On the first chunk ``a_1 = s_1`` is
    set and the rest is filtered from it.
    """

    def __init__(self, half_life_tokens: float) -> None:
        if not half_life_tokens > 0:
            raise ValueError("half_life_tokens must be > 0")
        self.alpha = 0.5 ** (1.0 / half_life_tokens)
        self._b0 = 1.0 - self.alpha
        self._b = np.array([self._b0])
        self._a = np.array([1.0, -self.alpha])
        self.n = 0
        self._e = 0.0

    @property
    def value(self) -> float:
        return self._e if self.n else 0.0

    def push(self, score: float) -> float:
        s = float(score)
        # lfilter's step: y = b0 x + z with z = α y_prev
        self._e = s if self.n == 0 else self._b0 * s + self.alpha * self._e
        self.n += 1
        return self._e

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_chunk(scores)
        if x.size == 0:
            return x.copy()
        if self.n == 0:  # a_1 = s_1 exactly, then filter the rest from it
            out = np.empty_like(x)
            out[0] = x[0]
            if x.size > 1:
                out[1:], _ = lfilter(self._b, self._a, x[1:], zi=np.array([self.alpha * x[0]]))
        else:
            out, _ = lfilter(self._b, self._a, x, zi=np.array([self.alpha * self._e]))
        self._e = float(out[-1])
        self.n += x.size
        return out


class _Windowed:
    """State of the window kinds: ``N`` (``window``), tokens seen (``n``), the last
    ``min(N - 1, n)`` values as a float64 tail and the last ``a_t``."""

    def __init__(self, window_tokens: int, high: int) -> None:
        if not 1 <= window_tokens <= high:
            raise ValueError(f"window_tokens: expected an integer in [1, {high}]; found "
                             f"{window_tokens}")
        self.window = int(window_tokens)
        self.n = 0
        self._tail = np.empty(0, dtype=np.float64)
        self._value = 0.0

    @property
    def value(self) -> float:
        return self._value if self.n else 0.0

    def _seq(self, x: np.ndarray, before: float) -> np.ndarray:
        """``[before]*(N-1-len(tail)) + tail + x`` (float64, length ``N - 1 + len(x)``):
        the ``N - 1`` values preceding each of ``x``'s, ``before`` standing in for those
        before the request's first token."""
        return np.concatenate((np.full(self.window - 1 - self._tail.size, before),
                               self._tail, x))

    def _advance(self, seq: np.ndarray, m: int, out: np.ndarray) -> None:
        """After a chunk of ``m`` values (``seq`` from :meth:`_seq`, ``out`` its ``a_t``):
        keep the last ``N - 1`` real values, the last ``a_t`` and the count."""
        keep = min(self.window - 1, self._tail.size + m)
        self._tail = seq[seq.size - keep :].copy() if keep else np.empty(0, dtype=np.float64)
        self._value = float(out[-1])
        self.n += m


class WindowMaxAggregator(_Windowed):
    """``a_t = max(s_{t-N+1}, ..., s_t)`` (fewer terms while ``t < N``).

    Keeps the last ``N-1`` scores as a tail across chunks. Per chunk, the sequence
    ``[-inf]*(N-1-len(tail)) + tail + chunk`` is split into blocks of ``N``; with ``g``
    the running max from each block's start and ``h`` the running max to each block's
    end, the window starting at ``j`` has max ``max(h[j], g[j+N-1])`` (van Herk /
    Gil-Werman): O(chunk + N) work, all numpy.
    """

    def __init__(self, window_tokens: int) -> None:
        super().__init__(window_tokens, MAX_WINDOW_TOKENS)

    def push(self, score: float) -> float:
        s = float(score)
        w = self.window
        if w == 1:
            self._value = s
        else:
            self._value = max(float(self._tail.max()), s) if self._tail.size else s
            tail = self._tail if self._tail.size < w - 1 else self._tail[1:]
            self._tail = np.append(tail, s)
        self.n += 1
        return self._value

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_chunk(scores)
        if x.size == 0:
            return x.copy()
        w = self.window
        seq = self._seq(x, -np.inf)  # len = w - 1 + m
        m = x.size
        total = -(-seq.size // w) * w
        padded = np.full(total, -np.inf)
        padded[: seq.size] = seq
        blocks = padded.reshape(-1, w)
        g = np.maximum.accumulate(blocks, axis=1).ravel()
        h = np.maximum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].ravel()
        out = np.maximum(h[:m], g[w - 1 : w - 1 + m])
        self._advance(seq, m, out)
        return out


class MeanLogitAggregator:
    """``a_t = σ(L_t / t − a·log t)`` with ``L_t = L_{t-1} + logit(clip(s_t, ε, 1-ε))``
    summed sequentially in float64 (``σ(x) = 1 / (1 + exp(-x))``, ``ε = LOGIT_EPS``,
    ``a = length_slope``).

    ``skip_tokens = k > 0``: once more than ``k`` scores have been seen, the first ``k``
    are left out of the mean and of the count, ``a_t = σ((L_t − L_k)/(t − k) − a·log(t − k))``
    for ``t > k``; up to ``t = k`` it is the plain mean above. At a request's last
    in-scope token this is the statistic a probe fit on the mean of its rows ``k+1..n``
    (``n > k``; all ``n`` rows otherwise) is trained on (``probes.pooled.SourceData.skipping``):
    the first words of a request ("How", "What", "Can you") carry little of it yet.

    The running sums are two :class:`MeanAggregator` over the clipped logits, one for the
    first ``k`` and one for the rest (``logit`` is elementwise, so chunking cannot change
    a bit of the result; ``push`` uses the same numpy ufuncs on a scalar). Scores are
    probabilities ``sigmoid(z_t)``, so for ``|z_t| <= 13.8`` the aggregate is
    ``σ(mean_t z_t − a·log t)`` over the pooled tokens.

    ``t`` is the number of scores this aggregator has seen: for a tracker, the request's
    in-scope tokens so far, counted across every span in scope (e.g. ``scope: user`` over
    a multi-turn chat: all user tokens up to here, not only the current message's). At
    the last span end it is the request's whole in-scope count, the ``n`` a
    length-debiased probe is trained with (``probes.train.fit_length_slope``); earlier
    judged span ends see their prefix count. ``length_slope = 0`` skips the term and
    ``skip_tokens = 0`` the split: the arithmetic is then exactly that of the plain mean
    logit, bit for bit.
    """

    def __init__(self, length_slope: float = 0.0, skip_tokens: int = 0) -> None:
        self.length_slope = _check_slope(length_slope)
        if not (isinstance(skip_tokens, int) and 0 <= skip_tokens <= MAX_SKIP_TOKENS):
            raise ValueError(f"skip_tokens: expected an integer in [0, {MAX_SKIP_TOKENS}]; "
                             f"found {skip_tokens!r}")
        self.skip_tokens = skip_tokens
        self._head = MeanAggregator()   # the first skip_tokens logits
        self._mean = MeanAggregator()   # every later one
        self.n = 0

    @property
    def value(self) -> float:
        if not self.n:
            return 0.0
        if self._mean.n:
            m = _debias(np.float64(self._mean.value), np.float64(self._mean.n),
                        self.length_slope)
        else:
            m = _debias(np.float64(self._head.value), np.float64(self.n), self.length_slope)
        return float(_sigmoid(m))

    def push(self, score: float) -> float:
        self.n += 1
        agg = self._head if self.n <= self.skip_tokens else self._mean
        m = np.float64(agg.push(float(_logit(np.float64(score)))))
        return float(_sigmoid(_debias(m, np.float64(agg.n), self.length_slope)))

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_chunk(scores)
        if x.size == 0:
            return x.copy()
        lg = np.asarray(_logit(x))
        h = min(max(self.skip_tokens - self.n, 0), x.size)   # how many go to the head
        self.n += x.size
        parts = []
        for agg, chunk in ((self._head, lg[:h]), (self._mean, lg[h:])):
            if chunk.size:
                t = np.arange(agg.n + 1, agg.n + 1 + chunk.size, dtype=np.float64)
                parts.append(_debias(agg.update(chunk), t, self.length_slope))
        return np.asarray(_sigmoid(parts[0] if len(parts) == 1 else np.concatenate(parts)))


def _check_slope(length_slope: float) -> float:
    if not math.isfinite(length_slope):
        raise ValueError(f"length_slope: expected a finite number; found {length_slope}")
    return float(length_slope)


def _debias(x: np.ndarray | np.float64, t: np.ndarray | np.float64, slope: float
            ) -> np.ndarray | np.float64:
    """``x − a·log(t)`` (float64; ``x`` itself when ``a == 0``: not a bit changed)."""
    if slope == 0.0:
        return x
    return x - slope * np.log(t)


class SoftmaxLogitAggregator:
    """``a_t = σ(B_t / A_t − a·log t)`` with ``ℓ_i = logit(clip(s_i, ε, 1-ε))`` (as
    ``mean_logit``, ``ε = LOGIT_EPS``), ``q_i = ℓ_i / τ`` (``τ = temperature``),
    ``A_t = Σ_{i<=t} e^{q_i}``, ``B_t = Σ_{i<=t} e^{q_i} ℓ_i``, ``a = length_slope``.

    ``B_t / A_t = Σ_i softmax(q)_i ℓ_i``: the request logit of a softmax probe
    (``probes.token_pool.pool_logits`` with ``z = ℓ``, ``q = z / τ``), whose per-token
    logits ``z_i`` the served scores ``s_i = σ(z_i)`` carry (exactly while ``|z_i| <=
    13.8``). ``τ → ∞``: ``mean_logit``; ``τ → 0``: ``max_{i<=t} ℓ_i``.

    A FIXED pivot (0), no running max: ``|ℓ| <= 13.82`` and ``τ >= MIN_TEMPERATURE =
    0.25`` give ``|q| <= 55.3``, ``e^q`` in ``[1e-24, 1e24]``, so ``A`` and ``B`` neither
    overflow nor underflow in float64 for any realistic token count (softmax weights
    below ``1e-16`` of the largest are lost to rounding, as in any float64 softmax).
    ``A`` and ``B`` are two float64 running sums accumulated left to right (one
    ``np.cumsum`` each over ``[carried, chunk...]``, like :class:`MeanAggregator`), and
    ``push`` does the same scalar operations: any chunking gives bit-identical ``a_t``.
    A NaN score makes ``A``, ``B`` and every later ``a_t`` NaN (as ``mean_logit``).
    State: ``A``, ``B``, ``n``. ``t``: as :class:`MeanLogitAggregator` (in-scope tokens
    seen); ``length_slope = 0`` skips the term bit for bit.
    """

    def __init__(self, temperature: float, length_slope: float = 0.0) -> None:
        problem = _TEMPERATURE.check(temperature)  # the policy's own bound, one owner
        if problem is not None:
            raise ValueError(f"temperature: {problem}")
        self.temperature = float(temperature)
        self.length_slope = _check_slope(length_slope)
        self.n = 0
        self._a = 0.0  # A = Σ e^{q_i}
        self._b = 0.0  # B = Σ e^{q_i} ℓ_i

    @property
    def value(self) -> float:
        if not self.n:
            return 0.0
        x = _debias(np.float64(self._b) / np.float64(self._a), np.float64(self.n),
                    self.length_slope)
        return float(_sigmoid(x))

    def push(self, score: float) -> float:
        ell = np.float64(_logit(np.float64(score)))
        e = np.exp(ell / self.temperature)
        self._a = float(np.float64(self._a) + e)
        self._b = float(np.float64(self._b) + e * ell)
        self.n += 1
        x = _debias(np.float64(self._b) / np.float64(self._a), np.float64(self.n),
                    self.length_slope)
        return float(_sigmoid(x))

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_chunk(scores)
        if x.size == 0:
            return x.copy()
        ell = np.asarray(_logit(x))
        e = np.exp(ell / self.temperature)
        a = _carried_cumsum(self._a, e)
        b = _carried_cumsum(self._b, e * ell)
        t = np.arange(self.n + 1, self.n + 1 + x.size, dtype=np.float64)
        self._a, self._b = float(a[-1]), float(b[-1])
        self.n += x.size
        return np.asarray(_sigmoid(_debias(b / a, t, self.length_slope)))


class WindowMeanLogitAggregator(_Windowed):
    """``a_t = σ(W_t / k_t)``, ``W_t = Σ_{t-k_t < i <= t} ℓ_i``, ``k_t = min(t, N)``,
    ``ℓ_i = logit(clip(s_i, ε, 1-ε))`` (``ε = LOGIT_EPS``), ``N = window_tokens``.

    Each window is summed in float64 in ONE order whatever the chunking: per chunk of
    ``m`` scores, over ``seq = [0]*(N-1-len(tail)) + tail + ℓ(chunk)`` (the ``N - 1``
    logits before the chunk, zeros before the request's first token), ``acc = 0;
    acc += seq[j : j + m]`` for ``j = 0..N-1``: oldest to newest, leading zeros adding
    exactly nothing. So the result is bit-identical under any chunking and ``push``
    (the same code on a one-score chunk). Work O(m·N) (``N ≤ MAX_MEAN_WINDOW_TOKENS``);
    state: the last ``N - 1`` logits.

    Judged with ``min_tokens = N`` (a policy field), only full windows count: a request
    shorter than ``N`` never reaches a severity through this detector; with
    ``min_tokens = 1`` every prefix's running mean is judged too.
    """

    def __init__(self, window_tokens: int) -> None:
        super().__init__(window_tokens, MAX_MEAN_WINDOW_TOKENS)

    def push(self, score: float) -> float:
        return float(self.update(np.array([score], dtype=np.float64))[0])

    def update(self, scores: np.ndarray) -> np.ndarray:
        x = _as_chunk(scores)
        if x.size == 0:
            return x.copy()
        w, m = self.window, x.size
        seq = self._seq(np.asarray(_logit(x), dtype=np.float64), 0.0)  # len w - 1 + m
        acc = np.zeros(m, dtype=np.float64)
        for j in range(w):
            acc += seq[j : j + m]
        k = np.minimum(np.arange(self.n + 1, self.n + 1 + m, dtype=np.float64), float(w))
        out = np.asarray(_sigmoid(acc / k))
        self._advance(seq, m, out)
        return out


def _logit(p: np.ndarray | np.float64) -> np.ndarray:
    """``log(q / (1 - q))`` with ``q = clip(p, ε, 1 - ε)`` (float64; NaN stays NaN)."""
    q = np.clip(p, LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(x: np.ndarray | np.float64) -> np.ndarray:
    """``1 / (1 + exp(-x))`` in float64 (``exp`` overflow to inf gives exactly 0)."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def span_end_rows(in_scope: np.ndarray, complete: bool = True) -> np.ndarray:
    """Rows where a ``judge_at: span_end`` detector is judged: in-scope rows whose next
    row (in row order) is out of scope, plus the last row when it is in scope and the
    request is ``complete``.

    ``in_scope`` bool [n]: the detector's scope mask over one request's rows in position
    order (every row of the request, in scope or not: an out-of-scope row is what ends a
    span). The tracker sees a request in chunks; it keeps a trailing in-scope row pending
    until a later out-of-scope row arrives or the request finishes (then it is judged),
    which selects exactly the rows this function selects on the whole request (tests
    compare over random chunkings). Returns bool [n].
    """
    m = np.asarray(in_scope, dtype=bool).reshape(-1)
    out = np.zeros(m.size, dtype=bool)
    if m.size == 0:
        return out
    out[:-1] = m[:-1] & ~m[1:]
    out[-1] = bool(m[-1]) and complete
    return out


# ------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class AggParam:
    """One parameter of an aggregation kind: a number (``integer``: an int) in
    ``(low, high]`` (``low_inclusive``: ``[low, high]``; both bounds infinite: any finite
    number). ``default``: the value when a policy leaves it out (None: required)."""

    name: str
    integer: bool
    low: float
    high: float
    low_inclusive: bool
    doc: str
    default: float | None = None

    def check(self, value: float) -> str | None:
        """None when `value` is valid, else the reason (``expected ...; found ...``)."""
        if self.integer:
            if not (isinstance(value, int) and self.low <= value <= self.high):
                return f"expected an integer in [{self.low:g}, {self.high:g}]; found {value}"
            return None
        if math.isinf(self.low) and math.isinf(self.high):
            return None if math.isfinite(value) else f"expected a finite number; found {value:g}"
        ok = math.isfinite(value) and (value >= self.low if self.low_inclusive
                                       else value > self.low) and value <= self.high
        if ok:
            return None
        if math.isinf(self.high):
            return f"expected {'>=' if self.low_inclusive else '>'} {self.low:g}; found {value:g}"
        return (f"expected a number in {'[' if self.low_inclusive else '('}{self.low:g}, "
                f"{self.high:g}]; found {value:g}")


@dataclass(frozen=True)
class AggregationKind:
    """Everything about one aggregation kind, defined once: its parameters (what the
    policy accepts and validates), the math, how it is shown, and its aggregator."""

    name: str
    params: tuple[AggParam, ...]
    math: str
    factory: Callable[[Aggregation], Aggregator]
    short: Callable[[Aggregation], str]

    def param(self, name: str) -> AggParam | None:
        """The parameter called `name`, or None when this kind has none of that name."""
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class Aggregation:
    """How per-token scores of one request become one running score: a kind of
    `AGGREGATIONS` and exactly that kind's parameters (validated on construction)."""

    kind: str
    half_life_tokens: float | None = None
    window_tokens: int | None = None
    #: ``mean_logit`` and ``softmax_logit``: ``a`` of the length term ``− a·log t``
    #: (optional, default 0: filled in on construction, so ``Aggregation("mean_logit")``
    #: equals ``Aggregation("mean_logit", length_slope=0.0)``).
    length_slope: float | None = None
    #: ``softmax_logit`` only: ``τ`` of the softmax weights ``e^{ℓ/τ}`` (required: a
    #: softmax probe is trained at one temperature, so its policy must name it).
    temperature: float | None = None
    #: ``mean_logit`` only: the first ``k`` in-scope scores left out of the mean once more
    #: than ``k`` were seen (optional, default 0).
    skip_tokens: int | None = None

    def __post_init__(self) -> None:
        spec = AGGREGATIONS.get(self.kind)
        if spec is None:
            raise ValueError(f"aggregation kind: expected one of {AGGREGATION_KINDS}, found "
                             f"{self.kind!r}")
        for name in _PARAM_FIELDS:
            p = spec.param(name)
            value = getattr(self, name)
            if p is None and value is not None:
                raise ValueError(f"{name}: only applies to kind {param_owner(name)}; this "
                                 f"aggregation is kind {self.kind}")
            if p is not None:
                if value is None and p.default is not None:
                    value = p.default
                    object.__setattr__(self, name, value)
                if value is None:
                    raise ValueError(f"{name}: required for kind {self.kind}")
                problem = p.check(value)
                if problem is not None:
                    raise ValueError(f"{name}: {problem}")

    def describe(self) -> str:
        """Short human form for logs and reports: ``max``, ``ema(h=8)``,
        ``window_max(N=16)``."""
        return AGGREGATIONS[self.kind].short(self)

    def params(self) -> dict[str, float | int]:
        """The kind's parameters and their values (the policy / bundle form); an optional
        parameter at its default is left out, as a policy would leave it out."""
        return {p.name: getattr(self, p.name) for p in AGGREGATIONS[self.kind].params
                if p.default is None or getattr(self, p.name) != p.default}


def _req(value: float | int | None) -> float:
    assert value is not None  # Aggregation.__post_init__ guarantees it
    return value


_HALF_LIFE = AggParam("half_life_tokens", integer=False, low=0.0, high=math.inf,
                      low_inclusive=False, doc="tokens after which a score's weight halves")
_WINDOW = AggParam("window_tokens", integer=True, low=1, high=MAX_WINDOW_TOKENS,
                   low_inclusive=True, doc="tokens in the sliding window")
_MEAN_WINDOW = AggParam("window_tokens", integer=True, low=1, high=MAX_MEAN_WINDOW_TOKENS,
                        low_inclusive=True, doc="tokens in the sliding window")
_LENGTH_SLOPE = AggParam("length_slope", integer=False, low=-math.inf, high=math.inf,
                         low_inclusive=True, default=0.0,
                         doc="a of the length term: a_t = sigmoid(pooled logit - a*log t)")
_SKIP = AggParam("skip_tokens", integer=True, low=0, high=MAX_SKIP_TOKENS, low_inclusive=True,
                 default=0, doc="the first k in-scope scores left out of the mean (and of "
                 "t) once more than k were seen")
_TEMPERATURE = AggParam("temperature", integer=False, low=MIN_TEMPERATURE,
                        high=MAX_TEMPERATURE, low_inclusive=True,
                        doc="tau of the softmax weights exp(logit/tau) (required)")


def _mean_logit_name(a: Aggregation) -> str:
    """``mean_logit``, ``mean_logit(a=0.1)``, ``mean_logit(a=0.1, skip=4)``."""
    ps = ([f"a={_req(a.length_slope):g}"] if a.length_slope else []) + \
        ([f"skip={a.skip_tokens}"] if a.skip_tokens else [])
    return "mean_logit" + (f"({', '.join(ps)})" if ps else "")


#: The `Aggregation` fields that hold kind parameters (each is some kind's `AggParam`).
_PARAM_FIELDS = ("half_life_tokens", "window_tokens", "length_slope", "temperature",
                 "skip_tokens")

#: The aggregation kinds, by name (one definition: policy parser, tracker, probes).
AGGREGATIONS: dict[str, AggregationKind] = {k.name: k for k in (
    AggregationKind("max", (), "a_t = max_{i<=t} s_i", lambda a: MaxAggregator(),
                    lambda a: "max"),
    AggregationKind("mean", (), "a_t = (1/t) sum_{i<=t} s_i", lambda a: MeanAggregator(),
                    lambda a: "mean"),
    AggregationKind("mean_logit", (_LENGTH_SLOPE, _SKIP),
                    "a_t = sigmoid((1/t) sum_{i<=t} logit(clip(s_i, 1e-6, 1-1e-6))"
                    " - a log t), a = length_slope (default 0); skip_tokens = k (default 0):"
                    " for t > k the sum and t start after the first k scores",
                    lambda a: MeanLogitAggregator(_req(a.length_slope),
                                                  int(_req(a.skip_tokens))),
                    _mean_logit_name),
    AggregationKind("ema", (_HALF_LIFE,),
                    "a_1 = s_1, a_t = alpha a_{t-1} + (1-alpha) s_t, alpha = 0.5**(1/h)",
                    lambda a: EmaAggregator(_req(a.half_life_tokens)),
                    lambda a: f"ema(h={_req(a.half_life_tokens):g})"),
    AggregationKind("window_max", (_WINDOW,), "a_t = max_{max(1,t-N+1)<=i<=t} s_i",
                    lambda a: WindowMaxAggregator(int(_req(a.window_tokens))),
                    lambda a: f"window_max(N={a.window_tokens})"),
    AggregationKind("window_mean_logit", (_MEAN_WINDOW,),
                    "a_t = sigmoid((1/k) sum_{t-k<i<=t} logit(clip(s_i, 1e-6, 1-1e-6))),"
                    " k = min(t, N)",
                    lambda a: WindowMeanLogitAggregator(int(_req(a.window_tokens))),
                    lambda a: f"window_mean_logit(N={a.window_tokens})"),
    AggregationKind("softmax_logit", (_TEMPERATURE, _LENGTH_SLOPE),
                    "a_t = sigmoid(sum_{i<=t} w_i l_i / sum_{i<=t} w_i - a log t),"
                    " l_i = logit(clip(s_i, 1e-6, 1-1e-6)), w_i = exp(l_i / tau),"
                    " tau = temperature, a = length_slope (default 0)",
                    lambda a: SoftmaxLogitAggregator(_req(a.temperature),
                                                     _req(a.length_slope)),
                    lambda a: f"softmax_logit(tau={_req(a.temperature):g}"
                    + (f", a={_req(a.length_slope):g})" if a.length_slope else ")")),
)}
AGGREGATION_KINDS: tuple[str, ...] = tuple(AGGREGATIONS)


def param_owner(name: str) -> str:
    """The kind(s) a parameter belongs to (for "only applies to kind ..." messages)."""
    return " or ".join(k.name for k in AGGREGATIONS.values() if k.param(name)) or "none"


def make_aggregator(agg: Aggregation) -> Aggregator:
    """A fresh aggregator for `agg` (its kind's factory in `AGGREGATIONS`)."""
    return AGGREGATIONS[agg.kind].factory(agg)
