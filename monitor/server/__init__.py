"""The sidecar server: request lifecycle (`registry.py`), gRPC service (`service.py`),
scoring queue + worker (`pipeline.py`), settings (`config.py`), process wiring, signals,
reload and shutdown (`app.py`)."""

from monitor.server.app import (
    MonitorApp,
    StartupError,
    build_app,
    capture_plan,
    run_server,
    serve,
)
from monitor.server.config import ServerConfig
from monitor.server.pipeline import Pipeline, QueueFull
from monitor.server.registry import RequestRegistry

__all__ = [
    "MonitorApp",
    "Pipeline",
    "QueueFull",
    "RequestRegistry",
    "ServerConfig",
    "StartupError",
    "build_app",
    "capture_plan",
    "run_server",
    "serve",
]
