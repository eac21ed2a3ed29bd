"""`safety-monitor` command line: serve, export-onnx, check, plan, placeholder-bundle, replay.

Startup problems (broken bundle or policy, unbindable address) print one line to stderr
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from google.protobuf import json_format

__all__ = ["main"]

log = logging.getLogger("monitor.cli")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _size(text: str) -> int:
    """Parse a byte size: 1048576, 64KiB, 64MiB, 1GiB (also k/M/G as powers of 1024)."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte size like 65536 or 64MiB, "
                                         f"found {text!r}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from monitor.server.access import AccessConfig, AccessError
    from monitor.server.app import ServerConfig, StartupError, serve
    from monitor.server.handlers import RpcLimits

    try:
        access = AccessConfig(tls_cert=args.tls_cert, tls_key=args.tls_key,
                              client_ca=args.tls_client_ca, token_file=args.token_file,
                              token_env=args.token_env, admin_host=args.admin_host,
                              admin_port=args.admin_port)
        limits = RpcLimits(max_streams=args.max_streams,
                           max_score_inflight=args.max_score_inflight)
    except (AccessError, ValueError) as e:
        print(f"safety-monitor: error: {e}", file=sys.stderr)
        return 2
    cfg = ServerConfig(
        bundle=args.bundle, policy=args.policy, host=args.host, port=args.port,
        metrics_host=args.metrics_host, metrics_port=args.metrics_port,
        audit_log=args.audit_log, audit_finals=args.audit_finals, queue_rows=args.queue_rows,
        max_batch_rows=args.max_batch_rows, max_frame_bytes=args.max_frame_bytes,
        grpc_max_message_bytes=args.grpc_max_message_bytes, compute_dtype=args.compute_dtype,
        max_requests=args.max_requests, policy_watch_s=args.policy_watch_s,
        grace_s=args.grace_s, torch_threads=args.torch_threads,
        orphan_grace_s=args.orphan_grace_s, backend=args.backend,
        onnx_threads=args.onnx_threads, access=access, limits=limits,
        audit_stdout=args.audit_stdout,
        alertmanager_urls=tuple(args.alertmanager_url or ()), webhook_url=args.webhook_url,
        webhook_secret_file=args.webhook_secret_file, alert_spool_dir=args.alert_spool_dir,
        alert_spool_max_bytes=args.alert_spool_max_bytes, alert_timeout_s=args.alert_timeout_s,
        alert_resend_s=args.alert_resend_s, alert_resolve_s=args.alert_resolve_s,
        runbook_url=args.runbook_url,
    )
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


def _cmd_plan(args: argparse.Namespace) -> int:
    from monitor.judge import PolicyError, default_policy, load_policy
    from monitor.score import BundleError, Scorer, load_bundle
    from monitor.server.app import capture_plan

    try:
        bundle = load_bundle(args.bundle)
        policy = load_policy(args.policy) if args.policy else default_policy(bundle.detectors)
    except (BundleError, PolicyError, OSError) as e:
        print(f"safety-monitor: error: {e}", file=sys.stderr)
        return 2
    plan = capture_plan(model=bundle.model_name, d_model=bundle.d_model,
                        bundle_sha256=bundle.sha256, policy=policy, scorer=Scorer(bundle),
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
    from monitor.replay import ReplayConfig, run_replay

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
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the monitor sidecar (gRPC + /metrics)")
    s.add_argument("--bundle", required=True, help="detector bundle directory")
    s.add_argument("--policy", help="policy YAML (default: the bundle's thresholds)")
    s.add_argument("--host", default="127.0.0.1", help="gRPC bind address")
    s.add_argument("--port", type=int, default=50051, help="gRPC port")
    s.add_argument("--metrics-host", default="127.0.0.1", help="/metrics bind address")
    s.add_argument("--metrics-port", type=int, default=9464, help="/metrics port (-1: off)")
    s.add_argument("--audit-log", help="JSONL audit log path (append)")
    s.add_argument("--audit-finals", action="store_true",
                   help="also write one audit line per final verdict")
    s.add_argument("--queue-rows", type=int, default=65536, help="scoring queue capacity, rows")
    s.add_argument("--max-batch-rows", type=int, default=4096, help="rows per scorer call")
    s.add_argument("--max-frame-bytes", type=_size, default=64 << 20,
                   help="largest frame payload accepted (bytes, e.g. 64MiB)")
    s.add_argument("--grpc-max-message-bytes", type=_size, default=None,
                   help="gRPC receive limit (default 2 x max-frame-bytes + 1MiB)")
    s.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32")
    s.add_argument("--max-requests", type=int, default=100_000, help="live requests kept")
    s.add_argument("--policy-watch-s", type=float, default=1.0,
                   help="policy file poll interval in seconds (0: off)")
    s.add_argument("--grace-s", type=float, default=5.0, help="shutdown grace, seconds")
    s.add_argument("--orphan-grace-s", type=float, default=30.0,
                   help="seconds a broken stream's open requests wait for a reconnecting "
                        "client before they are finished")
    s.add_argument("--audit-stdout", action="store_true",
                   help="also write audit lines to stdout as JSON lines (k8s log collectors)")
    a = s.add_argument_group("alert delivery (escalations of mode alert|block detectors)")
    a.add_argument("--alertmanager-url", action="append", metavar="URL",
                   help="Alertmanager base URL, e.g. http://alertmanager:9093 (repeatable: "
                        "every instance of an HA pair gets every alert)")
    a.add_argument("--webhook-url", help="generic JSON webhook (signed when a secret is set)")
    a.add_argument("--webhook-secret-file",
                   help="file with the webhook HMAC key (a mounted Secret); default: env "
                        "SAFETY_MONITOR_WEBHOOK_SECRET")
    a.add_argument("--alert-spool-dir",
                   help="durable spool of undelivered alerts (survives restarts); default: "
                        "in memory, lost at exit")
    a.add_argument("--alert-spool-max-bytes", type=_size, default=64 << 20,
                   help="spool bound per sink (oldest evicted and counted when full)")
    a.add_argument("--alert-timeout-s", type=float, default=5.0, help="HTTP timeout")
    a.add_argument("--alert-resend-s", type=float, default=60.0,
                   help="re-send active Alertmanager alerts this often")
    a.add_argument("--alert-resolve-s", type=float, default=300.0,
                   help="an Alertmanager alert resolves this long after its last escalation")
    a.add_argument("--runbook-url", default="",
                   help="base URL of docs/RUNBOOK.md, put on every delivered alert")
    s.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads for scoring (0: torch default)")
    s.add_argument("--backend", choices=("torch", "onnxruntime", "auto"), default="torch",
                   help="scorer: torch, onnxruntime (the bundle's ONNX graphs; torch is not "
                        "imported) or auto (start-up micro-benchmark on this CPU)")
    s.add_argument("--onnx-threads", type=int, default=0,
                   help="onnxruntime intra-op threads per layer (0: its default)")
    a = s.add_argument_group("access (TLS, token, Admin; see monitor/server/access.py)")
    a.add_argument("--tls-cert", help="PEM server certificate chain (with --tls-key: TLS only)")
    a.add_argument("--tls-key", help="PEM private key of --tls-cert")
    a.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates (mTLS)")
    a.add_argument("--token-file", help="file with the bearer token every call must carry")
    a.add_argument("--token-env", help="environment variable with the bearer token")
    a.add_argument("--admin-host", default="127.0.0.1", help="Admin service bind address")
    a.add_argument("--admin-port", type=int, default=-1,
                   help="Admin service (policy reload RPC) port; -1 (default): Admin off. "
                        "Never served on the data port")
    a.add_argument("--max-streams", type=int, default=1024,
                   help="concurrent Stream calls; more are refused (RESOURCE_EXHAUSTED)")
    a.add_argument("--max-score-inflight", type=int, default=2,
                   help="concurrent unary Score calls; more are refused before their "
                        "payload is read")
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
    pl.add_argument("--max-frame-bytes", type=_size, default=64 << 20)
    pl.set_defaults(func=_cmd_plan)

    b = sub.add_parser("placeholder-bundle", help="write a random PLACEHOLDER bundle")
    b.add_argument("out_dir")
    b.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    b.add_argument("--d-model", type=int, default=576)
    b.add_argument("--n-layers", type=int, default=30)
    b.add_argument("--layers", help="comma-separated layers (default n_layers//3, //2)")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=_cmd_placeholder)

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
    _setup_logging(args.log_level)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
