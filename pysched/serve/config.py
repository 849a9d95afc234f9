"""``ServeConfig``: every setting of the service, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysched.serve.protocol import (
    DEFAULT_MAX_BAD_MESSAGES,
    DEFAULT_MAX_MESSAGE_BYTES,
    GUARANTEES,
    MAX_TIMEOUT,
)

__all__ = ["ServeConfig"]


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one :func:`pysched.serve.create_app` application.

    Tokens: each of ``node_token``, ``client_token`` and ``admin_token``
    guards its kind of endpoint (see ``docs/protocol.md``). A kind whose
    token is None is open to anyone, which :meth:`validate` refuses unless
    ``insecure`` is True. Each field is described where it is declared.
    """

    #: bearer token of worker nodes (WebSocket /v1/nodes)
    node_token: str | None = None
    #: bearer token of job clients (/v1/jobs, /v1/sessions, /v1/dispatch, explain, stats)
    client_token: str | None = None
    #: bearer token of operators (drain/resume/remove; also grants the client endpoints)
    admin_token: str | None = None
    #: allow kinds without a token (development, demos)
    insecure: bool = False

    #: "at_least_once" (redeliver failed attempts) or "at_most_once" (only never-accepted ones)
    guarantee: str = "at_least_once"
    #: attempts per job, the first included
    max_attempts: int = 3
    #: seconds a node has for one attempt, unless the job says otherwise
    default_timeout: float = 30.0
    #: no capacity: wait up to this long for some to return (0: answer 503 at once)
    max_wait: float = 0.0
    #: at most this many requests wait for capacity at a time; the rest get 503 at once
    max_waiters: int = 1000
    #: Retry-After of 503 answers, seconds (whole seconds, as HTTP wants)
    retry_after: int = 1

    #: heartbeat interval the server asks nodes for, seconds
    heartbeat_interval: float = 1.0
    #: seconds a node connection has to send "register"
    register_timeout: float = 10.0
    #: largest WebSocket message or HTTP body, bytes
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: bad messages after which a WebSocket is closed
    max_bad_messages: int = DEFAULT_MAX_BAD_MESSAGES
    #: jobs in flight on one session stream
    max_session_in_flight: int = 1024
    #: outgoing messages queued for one connection before it is deemed stuck and closed
    max_send_queue: int = 65536

    #: SIGTERM / lifespan shutdown: seconds jobs in flight get to finish
    grace: float = 30.0

    def validate(self) -> ServeConfig:
        """Check every setting.

        :returns: self.
        :raises ValueError: naming the first bad setting (or the missing tokens).
        :raises TypeError: ``insecure`` is not a bool.
        """
        for name in ("node_token", "client_token", "admin_token"):
            value = getattr(self, name)
            if value is not None and (type(value) is not str or not value):
                raise ValueError(f"{name} must be a non-empty str or None, got {value!r}")
        if type(self.insecure) is not bool:
            raise TypeError(f"insecure must be a bool, got {self.insecure!r}")
        if self.guarantee not in GUARANTEES:
            raise ValueError(f"guarantee must be one of {GUARANTEES}, got {self.guarantee!r}")
        for name in ("max_attempts", "max_waiters", "max_message_bytes", "max_bad_messages",
                     "max_session_in_flight", "max_send_queue", "retry_after"):
            value = getattr(self, name)
            least = 0 if name == "max_waiters" else 1
            if type(value) is not int or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        for name in ("default_timeout", "heartbeat_interval", "register_timeout", "grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.default_timeout > MAX_TIMEOUT:
            raise ValueError(f"default_timeout must be <= {MAX_TIMEOUT}, got {self.default_timeout!r}")
        if isinstance(self.max_wait, bool) or not isinstance(self.max_wait, (int, float)) \
                or not 0 <= self.max_wait < math.inf:
            raise ValueError(f"max_wait must be a number >= 0, got {self.max_wait!r}")
        if not self.insecure:
            missing = [k for k in ("node_token", "client_token", "admin_token") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"no {', '.join(missing)} configured: give every token, "
                                 f"or pass insecure=True (--insecure) to leave those endpoints open")
        return self
