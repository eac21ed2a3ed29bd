"""In-worker projection (docs/CAPTURE.md "In-worker projection"): the plugin's sender thread
multiplies captured rows by a hook point's packed first-GEMM weights ``W`` and sends the
``n_cols`` pre-activations per row instead of ``d_model`` hidden-state values; the sidecar
finishes epilogue, read-out, aggregation and policy (``Scorer.projected_and_columns``).

Math: for rows ``x [n_rows, d_model]`` (any float dtype, upcast to float32),
``project(x) = x · W`` float32 ``[n_rows, n_cols]``, and when ``needs_var`` one more last
column ``var(x, correction=0)`` (the layer-norm factor of layer_norm columns; ``W``'s
layer_norm columns are already centred, so the row mean is not needed).

Thread rules: a `WorkerProjection` is immutable after `from_proto`; `project` runs on the
sender thread, never on the model's thread. On CUDA the same is one GEMM on the device
(``W`` moved once) before the device-to-host copy; here rows are host tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from monitor.v1 import monitor_pb2
from monitor.wire.hooks import parse_hook_name

__all__ = ["WorkerProjection"]


@dataclass(frozen=True, eq=False)
class WorkerProjection:
    """One hook point's projection from the capture plan (`HookProjection`).

    Attributes:
        hook_name: canonical hook point.
        version: what projected frames name (`ActivationFrame.projection`).
        w: float32 ``[d_model, n_cols]`` (read-only).
        needs_var: frames carry var(x) as one more last column.
    """

    hook_name: str
    version: str
    w: torch.Tensor
    needs_var: bool

    @property
    def width(self) -> int:
        """Values per projected row: ``n_cols`` (+1 with the var column)."""
        return int(self.w.shape[1]) + int(self.needs_var)

    @classmethod
    def from_proto(cls, p: monitor_pb2.HookProjection, d_model: int, field: str
                   ) -> WorkerProjection:
        """Validate `p` against the plan's `d_model`: sizes claimed vs bytes present before
        anything is allocated. Raises ValueError naming `field`, expected and found."""
        hook = parse_hook_name(p.hook_name, field=f"{field}.hook_name").name
        if not p.version:
            raise ValueError(f"{field}.version: expected a non-empty version, found ''")
        if int(p.d_model) != d_model:
            raise ValueError(f"{field}.d_model: expected the plan's d_model={d_model}, "
                             f"found {p.d_model}")
        k = int(p.n_cols)
        if k < 1:
            raise ValueError(f"{field}.n_cols: expected >= 1, found {k}")
        expected = d_model * k * 4  # Python int: no overflow
        if len(p.w) != expected:
            raise ValueError(f"{field}.w: expected {expected} bytes ({d_model}x{k} float32), "
                             f"found {len(p.w)}")
        w = np.frombuffer(p.w, dtype="<f4").reshape(d_model, k).astype(np.float32)
        if not np.isfinite(w).all():
            raise ValueError(f"{field}.w: expected finite values, found NaN/Inf")
        return cls(hook_name=hook, version=p.version, w=torch.from_numpy(w),
                   needs_var=bool(p.needs_var))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``[n_rows, width]`` from host rows ``x [n_rows, d_model]``."""
        xf = x.float()
        xw = torch.mm(xf, self.w)
        if not self.needs_var:
            return xw
        # numpy's two-pass var: ~1 ms for 256 x 4096 on one core, where torch.var measured
        # 10x slower on this CPU (bench/RESULTS.md "In-worker projection")
        var = torch.from_numpy(xf.numpy().var(axis=1, dtype=np.float32)).unsqueeze(1)
        return torch.cat([xw, var], dim=1)
