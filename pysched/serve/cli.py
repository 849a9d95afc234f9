"""``pysched serve``: run :func:`pysched.serve.create_app` under uvicorn.

:func:`add_arguments` imports only argparse-level modules (the serve extra
may be missing when another subcommand builds the parser); :func:`run`
loads Starlette, uvicorn and, with ``--redis``, redis-py.
"""

from __future__ import annotations

import argparse
import os
import sys

from pysched.tools.argtypes import non_negative_float as _non_negative
from pysched.tools.argtypes import positive_float as _positive
from pysched.tools.argtypes import positive_int as _count

__all__ = ["add_arguments", "run"]

_TOKEN_ENV = {"node": "PYSCHED_NODE_TOKEN", "client": "PYSCHED_CLIENT_TOKEN", "admin": "PYSCHED_ADMIN_TOKEN"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``pysched serve``.

    :param parser: the subcommand's parser.
    """
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000; 0 picks a free one)")
    net.add_argument("--root-path", default="", help="ASGI root_path when served under a URL prefix")
    net.add_argument("--ssl-certfile", help="TLS certificate file (PEM); enables HTTPS/WSS")
    net.add_argument("--ssl-keyfile", help="TLS private key file (PEM)")
    net.add_argument("--ssl-keyfile-password", help="password of the TLS key file")
    net.add_argument("--ssl-ca-certs", help="CA bundle to verify client certificates")
    net.add_argument("--ssl-cert-reqs", type=int, default=None,
                     help="client certificate requirement (ssl.CERT_NONE=0, OPTIONAL=1, REQUIRED=2)")
    net.add_argument("--ws-ping-interval", type=_positive, default=20.0,
                     help="WebSocket ping interval, seconds; a peer that does not answer within the same time "
                          "is dropped (default: 20)")

    auth = parser.add_argument_group("authentication (bearer tokens; environment variables are read when the "
                                     "option is not given)")
    for kind, env in _TOKEN_ENV.items():
        auth.add_argument(f"--{kind}-token", metavar="TOKEN", help=f"{kind} token (default: ${env})")
    auth.add_argument("--insecure", action="store_true",
                      help="start even when a kind of token is missing; that kind of endpoint is then open to all")

    jobs = parser.add_argument_group("delivery")
    jobs.add_argument("--guarantee", choices=("at_least_once", "at_most_once"), default="at_least_once",
                      help="redeliver failed attempts (at_least_once, default) or only never-accepted ones")
    jobs.add_argument("--max-attempts", type=_count, default=3, help="attempts per job (default: 3)")
    jobs.add_argument("--default-timeout", type=_positive, default=30.0,
                      help="seconds a node has for one attempt, unless the job says (default: 30)")
    jobs.add_argument("--max-wait", type=_non_negative, default=0.0,
                      help="no capacity: wait up to this long for some (default: 0, answer 503 at once)")
    jobs.add_argument("--max-waiters", type=int, default=1000,
                      help="requests waiting for capacity at a time (default: 1000)")
    jobs.add_argument("--retry-after", type=_count, default=1, help="Retry-After of 503 answers, s (default: 1)")
    jobs.add_argument("--heartbeat-interval", type=_positive, default=1.0,
                      help="heartbeat interval asked of nodes, seconds (default: 1)")
    jobs.add_argument("--max-message-bytes", type=_count, default=1 << 20,
                      help="largest WebSocket message or HTTP body (default: 1 MiB)")
    jobs.add_argument("--max-bad-messages", type=_count, default=3,
                      help="bad messages before a WebSocket is closed (default: 3)")
    jobs.add_argument("--max-session-in-flight", type=_count, default=1024,
                      help="jobs in flight on one session stream (default: 1024)")
    jobs.add_argument("--grace", type=_positive, default=30.0,
                      help="on SIGTERM, seconds jobs in flight get to finish (default: 30)")

    sched = parser.add_argument_group("scheduler")
    sched.add_argument("--heartbeat-timeout", type=_positive, default=10.0,
                       help="seconds without a heartbeat before a node gets no jobs (default: 10)")
    sched.add_argument("--reservation-ttl", type=_positive, default=90.0,
                       help="seconds an unaccepted job holds capacity (default: 90)")
    sched.add_argument("--resource-threshold", type=float, default=85.0,
                       help="cpu/gpu/mem percent at which a node is overloaded (default: 85)")
    sched.add_argument("--max-pools", type=_count, default=50, help="most auto pools (default: 50)")
    sched.add_argument("--session-ttl", type=_positive, default=3600.0,
                       help="seconds after which an idle session is forgotten (default: 3600)")
    sched.add_argument("--seed", type=int, default=None, help="seed of the tie-break (default: random)")
    sched.add_argument("--kernel", choices=("auto", "compiled", "python"), default="auto",
                       help="dispatch kernel (default: auto)")
    sched.add_argument("--redis", metavar="URL",
                       help="share capacity and the fleet with other instances through Redis "
                            "(RedisReservations + RedisFleet), e.g. redis://127.0.0.1:6379/0")
    sched.add_argument("--namespace", default="pysched", help="Redis key namespace (default: pysched)")
    sched.add_argument("--redis-timeout", type=_positive, default=0.5,
                       help="Redis socket timeout: how long a call waits for an unreachable Redis (default: 0.5)")

    ops = parser.add_argument_group("operations")
    ops.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                     help="log level (default: info)")
    ops.add_argument("--access-log", action="store_true", help="log every HTTP request (off by default)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT (which drain first).

    :param args: the parsed options (:func:`add_arguments`).
    :returns: the exit status.
    """
    import asyncio
    import logging

    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover - the extra is missing
        print(f"pysched serve needs the serve extra: pip install \"pysched[serve]\" ({exc})", file=sys.stderr)
        return 2

    from pysched import Scheduler
    from pysched.serve.app import Service, create_app
    from pysched.serve.config import ServeConfig

    tokens = {kind: getattr(args, f"{kind}_token") or os.environ.get(env) or None for kind, env in _TOKEN_ENV.items()}
    config = ServeConfig(
        node_token=tokens["node"], client_token=tokens["client"], admin_token=tokens["admin"],
        insecure=args.insecure, guarantee=args.guarantee, max_attempts=args.max_attempts,
        default_timeout=args.default_timeout, max_wait=args.max_wait, max_waiters=args.max_waiters,
        retry_after=args.retry_after, heartbeat_interval=args.heartbeat_interval,
        max_message_bytes=args.max_message_bytes, max_bad_messages=args.max_bad_messages,
        max_session_in_flight=args.max_session_in_flight, grace=args.grace,
    )
    try:
        config.validate()
    except (ValueError, TypeError) as exc:
        print(f"pysched serve: {exc}", file=sys.stderr)
        return 2

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("pysched").setLevel(level)

    fleet = None
    kwargs = {"heartbeat_timeout": args.heartbeat_timeout, "reservation_ttl": args.reservation_ttl,
              "resource_threshold": args.resource_threshold, "max_pools": args.max_pools,
              "session_ttl": args.session_ttl, "seed": args.seed}
    if args.redis:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            print(f"--redis needs redis-py: pip install \"pysched[redis]\" ({exc})", file=sys.stderr)
            return 2
        from pysched import RedisFleet, RedisReservations

        client = redis.Redis.from_url(args.redis, socket_timeout=args.redis_timeout,
                                      socket_connect_timeout=args.redis_timeout, retry=Retry(NoBackoff(), 0))
        sched = Scheduler(reservations=RedisReservations(client, namespace=args.namespace), kernel=args.kernel,
                          **kwargs)
        fleet = RedisFleet(sched, client, args.namespace).start()  # before any node registers
    else:
        sched = Scheduler(kernel=args.kernel, **kwargs)

    app = create_app(sched, config)
    service: Service = app.state.service
    uv_config = uvicorn.Config(
        app, host=args.host, port=args.port, root_path=args.root_path, log_level=args.log_level,
        access_log=args.access_log, lifespan="on", ws_max_size=4 * config.max_message_bytes,
        ws_per_message_deflate=False, ws_ping_interval=args.ws_ping_interval,
        ws_ping_timeout=args.ws_ping_interval, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        ssl_keyfile_password=args.ssl_keyfile_password, ssl_ca_certs=args.ssl_ca_certs,
        **({} if args.ssl_cert_reqs is None else {"ssl_cert_reqs": args.ssl_cert_reqs}),
        timeout_graceful_shutdown=5,
    )

    class DrainingServer(uvicorn.Server):
        """uvicorn, but a shutdown signal first drains the service while connections stay open.

        uvicorn's own shutdown closes every WebSocket at once (1012); nodes
        must stay connected until the jobs in flight on them finish, so the
        main loop keeps ticking until :meth:`Service.shutdown` (drain, then
        close with 1001) is done. A second Ctrl+C (``force_exit``) skips it.
        """

        drain_task: asyncio.Task[None] | None = None

        async def on_tick(self, counter: int) -> bool:
            if self.should_exit and not self.force_exit:
                if self.drain_task is None:
                    logging.getLogger("pysched.serve").info("shutdown requested: draining")
                    self.drain_task = asyncio.get_running_loop().create_task(service.shutdown())
                if not self.drain_task.done():
                    await super().on_tick(counter)  # keep the Date header fresh
                    return False
            return await super().on_tick(counter)

    server = DrainingServer(uv_config)
    try:
        server.run()
    finally:
        if fleet is not None:
            fleet.stop()
        sched.close()
    return 0
