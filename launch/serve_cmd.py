"""``trainmem serve FILE.toml``: start the memory services on Ray and keep them up.

Starts an embedded Ray cluster (or joins ``services.address``), deploys the retriever, the
memory layer (router + value shards: fresh, or a run's trained layer with ``--from-run``), the
consolidation scheduler and the HTTP API, prints the URL and where the bearer token is, and
serves until interrupted (SIGINT/SIGTERM stop it cleanly: replicas save their index;
``--for-seconds`` stops earlier, for scripts and tests).
"""

from __future__ import annotations

import argparse
import dataclasses
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
        print(f"trainmem serve: {message} (fix: trainmem serve FILE.toml [--from-run RUN_DIR --layer N] "
              "[--for-seconds S])", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trainmem serve", description="Start the memory services of a [services] table.")
    p.add_argument("file", help="TOML file with a [services] table, e.g. examples/memory.toml")
    p.add_argument("--from-run", metavar="RUN_DIR", help="serve this run's trained memory layer (services.memory_layer.from_run)")
    p.add_argument("--layer", type=int, help="with --from-run: the block of that layer (services.memory_layer.layer)")
    p.add_argument("--port", type=int, help="override services.http.port (0: a free port)")
    p.add_argument("--for-seconds", type=float, default=None, help="stop after this long (default: until Ctrl-C)")
    return p


def _configure(args):
    cfg = load_services(args.file)
    layer = cfg.memory_layer
    if args.from_run is not None or args.layer is not None:
        layer = dataclasses.replace(layer, from_run=args.from_run or layer.from_run,
                                    layer=layer.layer if args.layer is None else args.layer)
    http = cfg.http if args.port is None else dataclasses.replace(cfg.http, port=args.port)
    return dataclasses.replace(cfg, memory_layer=layer, http=http)


def _precheck(cfg):
    """What can fail without Ray, fails before Ray starts: the token's source, the run to serve from."""
    from trainmem.memory_services.layers.from_run import run_layer_config
    from trainmem.memory_services.serving.auth import token_source

    if cfg.memory_layer.enabled and cfg.memory_layer.from_run:
        run_layer_config(cfg.memory_layer.from_run, cfg.memory_layer.layer)
    return token_source(cfg.http, cfg.store_dir)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _configure(args)
        token, note = _precheck(cfg)
    except ConfigError as e:
        print(f"trainmem serve: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # config checks, TokenError, a run that cannot be served
        print(f"trainmem serve: {args.file}: services.{e}", file=sys.stderr)
        return 2

    import ray

    from trainmem.memory_services import serve_app, shutdown_services, start_local_ray

    if cfg.address:
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        start_local_ray(cfg.num_cpus)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    code = 0
    try:
        served = serve_app(cfg, token=token)
        origin = served.layer_origin
        layer = (f"layer v{served.layer_version} from run {origin['run_dir']} block {origin['layer']} step {origin['step']}"
                 if origin.get("kind") == "run" else f"layer v{served.layer_version} ({origin.get('kind', 'off')})")
        print(f"trainmem serve: memory services at {served.url} (store {cfg.store_path}; {layer})", flush=True)
        print(f"trainmem serve: token: {note or 'none (auth = none on a loopback host)'}", flush=True)
        print("trainmem serve: Ctrl-C stops", flush=True)
        stop.wait(args.for_seconds)
    except ValueError as e:
        print(f"trainmem serve: {args.file}: services.{e}", file=sys.stderr)
        code = 2
    finally:
        try:
            shutdown_services()
        except Exception:  # nothing was deployed (a bad setup): nothing to remove
            pass
        ray.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
