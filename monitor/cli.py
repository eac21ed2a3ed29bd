"""`safety-monitor` command line: serve, export-onnx, check, plan, placeholder-bundle, replay,
report, explain.

Startup problems (broken bundle or policy, unbindable address) print one line to stderr
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence

from google.protobuf import json_format

from monitor.server.config import LOG_LEVELS, parse_size
from monitor.server.config import add_arguments as add_server_arguments

__all__ = ["main"]

log = logging.getLogger("monitor.cli")


class _JsonFormatter(logging.Formatter):
    """One JSON object per log line: ts, level, logger, message (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _cmd_serve(args: argparse.Namespace) -> int:
    from monitor.server.app import StartupError, serve
    from monitor.server.config import from_args

    cfg = from_args(args)
    try:
        return serve(cfg)
    except StartupError as e:
        print(f"safety-monitor: error: {e}", file=sys.stderr)
        return 2


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from monitor.score import BundleError
    from monitor.score.onnx_export import export_onnx

    try:
        b = export_onnx(args.bundle)
    except (BundleError, OSError) as e:
        print(f"safety-monitor: error: {e}", file=sys.stderr)
        return 2
    assert b.onnx is not None
    print(f"wrote {len(b.onnx.files)} ONNX graphs (opset {b.onnx.opset}) into {args.bundle}: "
          f"{[p.name for p in b.onnx.files.values()]}; bundle sha256 {b.sha256[:12]}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from monitor.judge import run_check

    # pass the stream explicitly: run_check binds sys.stdout as a default at import time
    rc = run_check(args.policy, args.bundle, out=sys.stdout)
    return 1 if rc else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from monitor.report.summary import format_summary, parse_since, summarise

    try:
        since = parse_since(args.since)
        lines: list[str] = []
        for path in args.audit_log:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines.extend(f)
    except (ValueError, OSError) as e:
        print(f"safety-monitor report: error: {e}", file=sys.stderr)
        return 2
    format_summary(summarise(lines, since), sys.stdout, as_json=args.json)
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from monitor.report.explain import explain, format_explanation

    def lines() -> Iterator[str]:
        for path in args.audit_log:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from f

    try:
        ex = explain(lines(), args.request_id)
    except OSError as e:
        print(f"safety-monitor explain: error: {e}", file=sys.stderr)
        return 2
    format_explanation(ex, sys.stdout, as_json=args.json)
    return 0 if ex.detectors else 1


def _cmd_plan(args: argparse.Namespace) -> int:
    from monitor.judge import PolicyError, default_policy, load_policy
    from monitor.score import BundleError
    from monitor.score.available import installed_backend
    from monitor.score.backend import load_scorer
    from monitor.server.app import capture_plan

    try:  # torch where installed, else the bundle's ONNX graphs (the slim image)
        loaded = load_scorer(args.bundle, installed_backend())
        bundle = loaded.bundle
        policy = load_policy(args.policy) if args.policy else default_policy(bundle.detectors)
    except (BundleError, PolicyError, OSError, ValueError) as e:
        print(f"safety-monitor: error: {e}", file=sys.stderr)
        return 2
    plan = capture_plan(model=bundle.model_name, d_model=bundle.d_model,
                        n_layers=int(bundle.n_layers), bundle_sha256=bundle.sha256,
                        policy=policy, scorer=loaded.scorer,
                        max_frame_bytes=args.max_frame_bytes)
    doc = json_format.MessageToDict(plan, preserving_proto_field_name=True)
    print(json.dumps(doc, indent=2))
    return 0


def _cmd_placeholder(args: argparse.Namespace) -> int:
    from monitor.score import build_placeholder_bundle

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    b = build_placeholder_bundle(args.out_dir, model_name=args.model, d_model=args.d_model,
                                 n_layers=args.n_layers, layers=layers, seed=args.seed)
    print(f"wrote PLACEHOLDER bundle {b.name} to {args.out_dir} (sha256 {b.sha256[:12]}, "
          f"layers {list(b.layers)}, detectors {[d.name for d in b.detectors]}); "
          "random directions, no safety meaning")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from monitor.tools.replay import ReplayConfig, run_replay

    cfg = ReplayConfig(target=args.target, n_requests=args.requests, prompt_len=args.prompt_len,
                       gen_len=args.gen_len, push_fraction=args.push_fraction, seed=args.seed,
                       dtype=args.dtype, concurrency=args.concurrency)
    try:
        result = run_replay(cfg, out=sys.stdout)
    except Exception as e:  # connection refused, plan errors
        print(f"safety-monitor replay: error: {e}", file=sys.stderr)
        return 2
    return 0 if not result.errors else 1


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `safety-monitor`."""
    p = argparse.ArgumentParser(prog="safety-monitor", description=__doc__.splitlines()[0])
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text lines, or one JSON object per line")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the monitor sidecar (gRPC + /metrics)")
    add_server_arguments(s)
    s.set_defaults(func=_cmd_serve)

    e = sub.add_parser("export-onnx", help="write the bundle's packed layers as ONNX graphs "
                       "beside it and pin them in its manifest")
    e.add_argument("--bundle", required=True, help="detector bundle directory (rewritten)")
    e.set_defaults(func=_cmd_export_onnx)

    c = sub.add_parser("check", help="validate a policy against a bundle (exit 0/1)")
    c.add_argument("--bundle", required=True)
    c.add_argument("--policy", required=True)
    c.set_defaults(func=_cmd_check)

    pl = sub.add_parser("plan", help="print the capture plan JSON")
    pl.add_argument("--bundle", required=True)
    pl.add_argument("--policy")
    pl.add_argument("--max-frame-bytes", type=parse_size, default=64 << 20)
    pl.set_defaults(func=_cmd_plan)

    b = sub.add_parser("placeholder-bundle", help="write a random PLACEHOLDER bundle")
    b.add_argument("out_dir")
    b.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    b.add_argument("--d-model", type=int, default=576)
    b.add_argument("--n-layers", type=int, default=30)
    b.add_argument("--layers", help="comma-separated layers (default n_layers//3, //2)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_cmd_placeholder)

    rp = sub.add_parser("report", help="would-alert / would-block / alert / block counts and "
                        "rates per detector and severity from the audit log")
    rp.add_argument("--audit-log", action="append", required=True,
                    help="audit JSONL file (repeatable: rotated files)")
    rp.add_argument("--since", default="24h", help="window: a number and s|m|h|d")
    rp.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    rp.set_defaults(func=_cmd_report)

    ex = sub.add_parser("explain", help="one request from the audit log: events, per-token "
                        "scores and the SAE latents that fired, with labels")
    ex.add_argument("request_id", help="engine request id or the caller's correlation id")
    ex.add_argument("--audit-log", action="append", required=True,
                    help="audit JSONL file (repeatable: rotated files)")
    ex.add_argument("--json", action="store_true", help="one JSON object instead of text")
    ex.set_defaults(func=_cmd_explain)

    r = sub.add_parser("replay", help="stream synthetic requests to a running server")
    r.add_argument("--target", default="127.0.0.1:50051")
    r.add_argument("--requests", type=int, default=8)
    r.add_argument("--concurrency", type=int, default=4, help="requests per engine step")
    r.add_argument("--prompt-len", type=int, default=24)
    r.add_argument("--gen-len", type=int, default=16)
    r.add_argument("--push-fraction", type=float, default=0.5,
                   help="fraction of requests pushed along a detector direction")
    r.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="bf16")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_cmd_replay)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safety-monitor` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
