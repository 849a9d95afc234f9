"""Bearer tokens: one per kind of caller (node, client, admin), compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from pysched.serve.config import ServeConfig
from pysched.serve.errors import ServeError
from pysched.serve.protocol import ErrorCode

__all__ = ["ADMIN", "CLIENT", "NODE", "Auth"]

NODE = "node"
CLIENT = "client"
ADMIN = "admin"


class Auth:
    """Checks ``Authorization: Bearer <token>`` against the configured tokens.

    :param config: where the tokens are (a kind without one is open to all).
    """

    def __init__(self, config: ServeConfig) -> None:
        self._tokens: dict[str, bytes | None] = {
            NODE: _b(config.node_token),
            CLIENT: _b(config.client_token),
            ADMIN: _b(config.admin_token),
        }

    def check(self, headers: Mapping[str, str], *kinds: str) -> str:
        """Check the caller's token.

        A kind without a token (``--insecure``) admits every caller.

        :param headers: the request's headers (lower-case names).
        :param kinds: the kinds of token the endpoint accepts (:data:`NODE`, :data:`CLIENT`, :data:`ADMIN`).
        :returns: the kind of the caller's token.
        :raises ServeError: ``unauthorized`` (401): no token, or not one of ours;
            ``forbidden`` (403): a token of another kind.
        """
        for kind in kinds:
            if self._tokens[kind] is None:
                return kind
        header = headers.get("authorization")
        if header is None:
            raise ServeError(ErrorCode.UNAUTHORIZED, "missing Authorization: Bearer <token>")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ServeError(ErrorCode.UNAUTHORIZED, "Authorization must be: Bearer <token>")
        token = given.strip().encode()
        # Compare against every token (not only the wanted kinds) so the time
        # taken does not depend on which kind, if any, the token matches.
        matched = [kind for kind, want in self._tokens.items() if want is not None and hmac.compare_digest(token, want)]
        for kind in kinds:
            if kind in matched:
                return kind
        if matched:
            raise ServeError(ErrorCode.FORBIDDEN, f"a {matched[0]} token does not grant this endpoint "
                                                  f"(needs: {' or '.join(kinds)})")
        raise ServeError(ErrorCode.UNAUTHORIZED, "invalid token")


def _b(token: str | None) -> bytes | None:
    return None if token is None else token.encode()
