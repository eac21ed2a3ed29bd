"""The sidecar server: gRPC service (`service.py`), scoring queue + worker (`pipeline.py`),
process wiring, signals and shutdown (`app.py`)."""

from monitor.server.app import (
    HOOK_NAME_TEMPLATE,
    MonitorApp,
    ServerConfig,
    StartupError,
    build_app,
    capture_plan,
    run_server,
    serve,
)
from monitor.server.pipeline import Pipeline, QueueFull, verdict_message

__all__ = [
    "HOOK_NAME_TEMPLATE",
    "MonitorApp",
    "Pipeline",
    "QueueFull",
    "ServerConfig",
    "StartupError",
    "build_app",
    "capture_plan",
    "run_server",
    "serve",
    "verdict_message",
]
