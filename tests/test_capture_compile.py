"""The capture op under torch.compile: no graph breaks, no extra graphs, no recompiles,
and the op's implementation runs inside compiled code with the right rows.

Uses the synthetic decoder of `tests/synthetic_decoder.py` (vLLM's decoder-layer calling
convention, no vLLM): vLLM's own compiled engine on this CPU takes minutes to compile,
the graph structure the op produces is the same (the op sits between decoder layers).
`bench/bench_capture_op.py` measures the cost; `tests/test_vllm_capture.py` covers vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from synthetic_decoder import SyntheticDecoder
from torch._dynamo.testing import CompileCounter

from monitor.capture.op import SITE_IN, SITE_OUT, StaticBuffers, set_sink, wrap_decoder_layers

D, FF, L = 32, 64, 4


class _Rows:
    """LayerSink keeping a copy of every (layer, site) pair it is handed."""

    def __init__(self) -> None:
        self.got: dict[tuple[int, int], torch.Tensor] = {}

    def on_layer(self, layer: int, site: int, hidden: torch.Tensor,
                 residual: torch.Tensor | None, positions: torch.Tensor) -> None:
        s = hidden if residual is None else hidden + residual
        self.got[(layer, site)] = s.detach().clone()


def _reference(m: SyntheticDecoder, pos: torch.Tensor, x: torch.Tensor
               ) -> dict[tuple[int, int], torch.Tensor]:
    """resid_pre (SITE_IN sum) and resid_post (SITE_OUT sum) of every layer, eagerly."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    h, r = x, None
    for i, layer in enumerate(m.model.layers):
        out[(i, SITE_IN)] = h if r is None else h + r
        h, r = layer(pos, h, r)  # called before the layers are wrapped
        out[(i, SITE_OUT)] = h + r
    return out


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.arange(n, dtype=torch.int64), torch.randn(n, D, generator=g)


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    set_sink(None)
    torch._dynamo.reset()


def _graph_count(m: SyntheticDecoder) -> tuple[int, int, int]:
    """(graphs, FX nodes, graph breaks) of one compiled call with a counting backend.

    Run with a sink installed: the op's Python kernel and the sink run at call time and
    must not be traced as frames of their own (they would count as graphs)."""
    cnt = CompileCounter()
    f = torch.compile(m, backend=cnt, fullgraph=False)
    pos, x = _inputs(5)
    set_sink(_Rows())
    with torch.no_grad():
        f(pos, x)
        f(pos, x)  # same shapes: no recompile
    set_sink(None)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return cnt.frame_count, cnt.op_count, breaks


def test_op_adds_no_graph_and_no_break():
    m = SyntheticDecoder(D, FF, L)
    base = _graph_count(m)
    assert base[0] == 1 and base[2] == 0
    torch._dynamo.reset()
    meta = StaticBuffers(L).meta
    wanted = {1: frozenset({SITE_IN}), 2: frozenset({SITE_IN, SITE_OUT}), 3: frozenset({SITE_OUT})}
    wrap_decoder_layers(m.model.layers, wanted, meta)
    frames, ops, breaks = _graph_count(m)
    # one graph, no break; exactly one extra FX node per op call site (4 here)
    assert (frames, breaks) == (1, 0)
    assert ops == base[1] + 4


def test_op_runs_inside_inductor_graph_with_the_right_rows():
    m = SyntheticDecoder(D, FF, L)
    pos, x = _inputs(7)
    with torch.no_grad():
        ref = _reference(m, pos, x)
        meta = StaticBuffers(L).meta
        wrap_decoder_layers(m.model.layers, {0: frozenset({SITE_IN}), 2: frozenset({SITE_OUT})},
                            meta)
        f = torch.compile(m, backend="inductor", fullgraph=True)
        sink = _Rows()
        set_sink(sink)
        y = f(pos, x)
        assert meta.tolist() == [0, 0, 1, 0]  # the op's counter: output site of layer 2 only
        set_sink(None)  # the sink is read at run time: no recompile when it changes
        f(pos, x)
        assert meta.tolist() == [0, 0, 2, 0]
        set_sink(sink)
        pos2, x2 = _inputs(7)
        y2 = f(pos2, x2)
    assert sorted(sink.got) == [(0, SITE_IN), (2, SITE_OUT)]
    torch.testing.assert_close(sink.got[(0, SITE_IN)], ref[(0, SITE_IN)])
    torch.testing.assert_close(sink.got[(2, SITE_OUT)], ref[(2, SITE_OUT)], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(y, ref[(L - 1, SITE_OUT)], rtol=1e-4, atol=1e-4)


def test_static_op_graph_safe_rows_in_slots_eager_and_inductor():
    """The graph-safe op (the CUDA design): rows land in their static slots, the same in eager
    and compiled code, with one graph, no break and one node per op site."""
    m = SyntheticDecoder(D, FF, L)
    pos, x = _inputs(6)
    wanted = {0: frozenset({SITE_IN}), 2: frozenset({SITE_IN, SITE_OUT})}
    with torch.no_grad():
        ref = _reference(m, pos, x)
        base = _graph_count(m)
        torch._dynamo.reset()
        bufs = StaticBuffers(L, n_plan_layers=3, max_num_tokens=8, d_model=D)
        wrap_decoder_layers(m.model.layers, wanted, bufs.meta, bufs)
        hidden, positions = bufs.hidden, bufs.positions  # allocated: d_model given
        assert hidden is not None and positions is not None
        assert bufs.slots == {(0, SITE_IN): 0, (2, SITE_IN): 1, (2, SITE_OUT): 2}
        m(pos, x)
        eager = hidden.clone()
        assert bufs.meta.tolist() == [0, 0, 1, 0]
        frames, ops, breaks = _graph_count(m)
        assert (frames, breaks) == (1, 0) and ops == base[1] + 3
        torch._dynamo.reset()
        hidden.zero_()
        f = torch.compile(m, backend="inductor", fullgraph=True)
        f(pos, x)
    for key, slot in bufs.slots.items():
        torch.testing.assert_close(eager[slot, :6], ref[key], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden[slot, :6], ref[key], rtol=1e-4, atol=1e-4)
    assert bool((positions[:6] == pos).all())
    small = StaticBuffers(L, n_plan_layers=1, max_num_tokens=8, d_model=D)
    with pytest.raises(ValueError, match="static slots: expected >= 3, found 1"):
        wrap_decoder_layers(SyntheticDecoder(D, FF, L).model.layers, wanted, small.meta, small)
