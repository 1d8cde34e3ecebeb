"""``trainmem serve FILE.toml``: start the memory services on Ray and keep them up.

Starts an embedded Ray cluster (or joins ``services.address``), deploys the retriever, the
memory-layer lookup, the consolidation scheduler and the HTTP API, prints the URL, and serves
until interrupted (``--for-seconds`` stops earlier, for scripts and tests).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from trainmem.runtime.spec_loader import ConfigError, build_dataclass, read_toml


def load_services(path: str):
    """The ``[services]`` table of ``path`` as a validated ServicesConfig (ConfigError if bad)."""
    from trainmem.memory_services import ServicesConfig

    if not Path(path).exists():
        raise ConfigError(path, "<file>", "no such file", "pass the path of a TOML file with a [services] table")
    table = read_toml(path)
    services = table.get("services", {})
    if not isinstance(services, dict):
        raise ConfigError(path, "services", "must be a table", "write [services]")
    return build_dataclass(ServicesConfig, services, path, "services")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"trainmem serve: {message} (fix: trainmem serve FILE.toml [--for-seconds S])", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str]) -> int:
    p = _Parser(prog="trainmem serve", description="Start the memory services of a [services] table.")
    p.add_argument("file", help="TOML file with a [services] table, e.g. examples/memory.toml")
    p.add_argument("--for-seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    args = p.parse_args(argv)
    try:
        cfg = load_services(args.file)
        from trainmem.memory_services.serve import resolve_token

        token = resolve_token(cfg)
    except ConfigError as e:
        print(f"trainmem serve: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"trainmem serve: {args.file}: services.{e}", file=sys.stderr)
        return 2

    import ray

    from trainmem.memory_services import serve_app, shutdown_services

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if cfg.address:
        ray.init(address=cfg.address)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = serve_app(cfg, token=token)
        print(f"trainmem serve: memory services at {url} (store {cfg.store_path}); Ctrl-C stops", flush=True)
        try:
            stop.wait(args.for_seconds)
        except KeyboardInterrupt:
            pass
    finally:
        shutdown_services()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
