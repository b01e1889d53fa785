"""`llamaship up`: start the whole stack on one machine and supervise it until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from shared.config import INTERNAL_TLS, REDIS, SETTINGS, ConfigError, resolve


def _fail(message: str) -> int:
    print(f"llamaship: {message}", file=sys.stderr)
    return 1


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def cmd_up(args: argparse.Namespace) -> int:
    from llamaship.stack import Stack, StackConfig
    from llamaship.supervisor import RestartPolicy, Supervisor

    if not args.api_keys_file and args.host not in LOOPBACK and not args.allow_open:
        return _fail(f"refusing to serve on {args.host} without API keys: pass --api-keys-file "
                     "(llamaship keys create), or --allow-open to serve anyone who can reach it")
    if not 0 <= args.max_restarts <= 1000 or not 0 < args.restart_window_s <= 86400:
        return _fail("--max-restarts must be 0..1000 and --restart-window-s in (0, 86400]")

    try:
        redis_url, redis_settings = _redis(args)
        internal_env = _internal_tls(args)
    except ConfigError as exc:
        return _fail(str(exc))
    cfg = StackConfig(
        store=args.store if args.store.startswith("s3://") else Path(args.store).resolve(), log_dir=Path(args.log_dir).resolve(),
        redis_url=redis_url, redis_settings=redis_settings,
        host=args.host, gateway_port=args.gateway_port, compiler_port=args.compiler_port,
        serving_ports=[args.serving_port + i if args.serving_port else 0 for i in range(args.replicas)],
        slots=args.slots, metrics=True, echo_logs=args.verbose,
        env={k: str(Path(v).resolve()) for k, v in (("LLAMASHIP_API_KEYS_FILE", args.api_keys_file),
                                                      ("LLAMASHIP_TLS_CERT_FILE", args.tls_cert_file),
                                                      ("LLAMASHIP_TLS_KEY_FILE", args.tls_key_file)) if v}
        | internal_env | ({"LLAMASHIP_HTTP_PORT": str(args.http_port)} if args.http_port else {}),
    )
    stack = Stack(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("llamaship: starting the stack…", flush=True)
    try:
        stack.start()
    except RuntimeError as exc:
        return _fail(str(exc))
    _print_stack(stack, args)
    supervisor = Supervisor(stack, RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s),
                            say=lambda line: print(f"llamaship: {line}", file=sys.stderr, flush=True))
    return_code = 0
    try:
        while not stop.wait(0.25):
            supervisor.tick()
            hopeless = supervisor.nothing_useful_left()
            if hopeless:
                print(f"llamaship: {hopeless}; stopping the stack", file=sys.stderr, flush=True)
                return_code = 1
                break
    finally:
        print("llamaship: stopping…", flush=True)
        stack.stop()
    print("llamaship: stopped", flush=True)
    return return_code


def _redis(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    """The external Redis given by flag or env (None: embedded), and the other Redis settings the
    services get; validated here so that a bad one stops `up` before anything starts."""
    settings = resolve(REDIS, args)
    given = {n for n in REDIS if getattr(args, n, None) is not None or SETTINGS[n].env in os.environ}
    url = settings.redis_url if "redis_url" in given else None
    return url, {n: str(getattr(settings, n)) for n in given if n != "redis_url"}


def _internal_tls(args: argparse.Namespace) -> dict[str, str]:
    """The services' environment for mTLS between them (checked now, so a bad file stops `up` at once)."""
    from shared import internal_tls

    files = {"ca": args.internal_tls_ca, "cert": args.internal_tls_cert, "key": args.internal_tls_key}
    if args.internal_tls_generate:
        if any(files.values()):
            raise ConfigError("--internal-tls-generate makes its own CA: give it or --internal-tls-ca/-cert/-key")
        from llamaship.internal_certs import write_set

        names = sorted({"127.0.0.1", "localhost", args.host})
        files = {k: str(v) for k, v in write_set(Path(args.log_dir).resolve().parent / "internal-tls", names).items()}
    if not any(files.values()):
        return {}
    resolve(INTERNAL_TLS, {f"internal_tls_{k}": v for k, v in files.items()}, env={})  # all three or none
    internal_tls.check(files["ca"], files["cert"], files["key"])
    return {f"LLAMASHIP_INTERNAL_TLS_{k.upper()}": str(Path(v).resolve()) for k, v in files.items()}


def _print_stack(stack, args: argparse.Namespace) -> None:
    from shared.redis_conn import describe

    cfg = stack.cfg
    redis = stack.procs.get("redis")
    shown = stack.redis_url if redis or not stack.external_redis else \
        describe(resolve(REDIS, {"redis_url": stack.redis_url or None, **cfg.redis_settings}, env={}))
    print(f"  redis     {shown}" + (f" (embedded)   pid {redis.popen.pid}" if redis else ""))
    for name, proc in stack.procs.items():
        if name != "redis":
            metrics = stack.metrics_ports.get(name)
            print(f"  {name:<13} grpc {proc.address}   metrics http://{cfg.host}:{metrics}/metrics   "
                  f"pid {proc.popen.pid}   log {proc.log_path}")
    print(f"  store     {cfg.store}")
    auth = f"API keys from {args.api_keys_file}" if args.api_keys_file else \
        f"no API keys: open to anyone who can reach {args.host}" + (" (loopback only)" if args.host in LOOPBACK else "")
    print(f"gateway ready at {stack.gateway_address} ({auth}{', TLS' if args.tls_cert_file else ''}"
          f"{'; mTLS between services' if cfg.env.get('LLAMASHIP_INTERNAL_TLS_CA') else ''}). "
          f"Crashed services are restarted; Ctrl-C stops.", flush=True)
    if args.http_port:
        scheme = "https" if args.tls_cert_file else "http"
        print(f"OpenAI-compatible API at {scheme}://{cfg.host}:{args.http_port}/v1", flush=True)


