"""Ray Serve deployments of the memory services, their HTTP API and the Serve-handle client."""

from .app import APP_NAME, Served, serve_app, shutdown_services
from .handle_client import LayerClient

__all__ = ["APP_NAME", "LayerClient", "Served", "serve_app", "shutdown_services"]
