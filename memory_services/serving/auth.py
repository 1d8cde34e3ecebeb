"""Secure by default: where the bearer token comes from, and the gate every request passes.

The token never travels as a deployment argument (Ray keeps those in its metadata): the driver
hands replicas a ``TokenSource`` (an environment variable's name and/or a file path) and each
replica reads the token itself. With no token configured, ``trainmem serve`` generates one into
``<store>/token`` (mode 0600) and prints that path.

``Gate`` is plain ASGI middleware, so it runs before FastAPI reads anything: the token is checked
from the headers alone, then the body is read up to ``max_body_bytes`` (413 beyond, before any
parsing) and replayed to the app.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from ..config import HttpConfig

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")


@dataclass(frozen=True)
class TokenSource:
    """Where a replica finds the token; no secret in it."""

    env: str = ""
    file: str = ""
    required: bool = True


class TokenError(ValueError):
    """The token cannot be found or is stored unsafely; the message names where and the fix."""


def token_source(http: HttpConfig, store_dir: Path) -> tuple[TokenSource, str]:
    """The source replicas will read, and a line for the user ('' when nothing to say).

    Creates ``<store>/token`` when no token is configured anywhere.
    """
    if http.auth == "none":
        return TokenSource(required=False), ""
    if http.token_env:
        if not os.environ.get(http.token_env):
            raise TokenError(f"http.token_env={http.token_env!r} names an unset or empty environment variable "
                             f"(fix: export {http.token_env}=..., or unset token_env to use a token file)")
        return TokenSource(env=http.token_env), f"token from ${http.token_env}"
    path = Path(http.token_file) if http.token_file else store_dir / "token"
    if path.exists():
        read_token_file(path)  # fails early, naming the file, if it is unsafe or empty
        return TokenSource(file=str(path.resolve())), f"token in {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return TokenSource(file=str(path.resolve())), f"generated a token in {path} (mode 0600)"


def read_token_file(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TokenError(f"{path}: token file has mode {mode:04o}, readable by others (fix: chmod 600 {path})")
    token = path.read_text().strip()
    if not token:
        raise TokenError(f"{path}: token file is empty (fix: write a token into it, or delete it to generate one)")
    return token


def read_token(source: TokenSource) -> str:
    """Inside a replica: the token ('' when none is required)."""
    if not source.required:
        return ""
    if source.env and os.environ.get(source.env):
        return os.environ[source.env]
    if source.file:
        return read_token_file(Path(source.file))
    raise TokenError(f"the token variable ${source.env} is not set in this replica's environment (fix: export it "
                     "on every node of the cluster, or use http.token_file)")


_state = {"token": "", "max_body": 8 << 20}


def configure(token: str, max_body_bytes: int) -> None:
    _state["token"], _state["max_body"] = token, max_body_bytes


async def _reply(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: bearer token, then a bounded body, before the app sees the request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        token = _state["token"]
        if token and scope["path"] not in OPEN_PATHS:
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return await _reply(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
        limit = _state["max_body"]
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _reply(send, 413, f"request body of {declared.decode()[:20]} bytes exceeds "
                                           f"max_body_bytes={limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)  # a disconnect: let the app see it
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _reply(send, 413, f"request body exceeds max_body_bytes={limit}")
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)
