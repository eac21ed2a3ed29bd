"""vLLM capture plugin: residual-stream capture inside vLLM, streamed to the sidecar.

- `plugin`: `register()` (the `vllm.general_plugins` entry point), configuration gate,
  `load_model` wrapping, `CaptureSession` (docs/CAPTURE.md).
- `op`: the `safety_monitor::capture_resid` custom op and the decoder-layer wrapper.
- `steps`: forward-pass rows → request, position, token kind; finished requests.
- `transport`: host ring, bounded queue, sender thread, reconnect, counters.
- `config`: environment variables (`SAFETY_MONITOR_ADDR` enables the plugin).

Importing this package does not import vLLM; `plugin.register()` does, only when enabled.
"""
