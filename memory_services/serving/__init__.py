"""Ray Serve deployments of the memory services, their HTTP API and the Serve-handle client."""

from trainmem.lazy import lazy_getattr

# Names load on first use: a Serve replica imports only its own deployment's module (an ingress
# replica then loads neither torch nor the layer code that serve_app needs).
_WHERE = {**dict.fromkeys(("APP_NAME", "Served", "serve_app", "shutdown_services", "start_local_ray"), "app"),
          "LayerClient": "handle_client"}

__all__ = sorted(_WHERE)

__getattr__ = lazy_getattr(__name__, _WHERE)
