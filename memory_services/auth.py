"""Bearer-token check of the HTTP API.

The token lives in this module (imported by reference everywhere): Ray pickles the ingress
class by value, so a global inside that class's own module would be a per-pickle copy.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from fastapi.responses import JSONResponse

_state = {"token": ""}


def set_token(token: str) -> None:
    _state["token"] = token


async def require_token(request: Request, call_next):
    """HTTP middleware: runs before the body is read, so a caller without the token learns nothing."""
    token = _state["token"]
    if token and request.url.path != "/health":  # liveness stays open for probes
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return JSONResponse(
                {"error": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"}
            )
    return await call_next(request)
