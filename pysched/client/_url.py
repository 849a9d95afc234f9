"""URL helpers shared by the node and job clients (stdlib only)."""

from __future__ import annotations

from urllib.parse import SplitResult, quote, urlsplit, urlunsplit

__all__ = ["bearer", "http_base", "quote_segment", "ws_url"]

_TO_WS = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_TO_HTTP = {"ws": "http", "wss": "https", "http": "http", "https": "https"}


def _split(url: object, name: str) -> SplitResult:
    if not isinstance(url, str) or not url:
        raise ValueError(f"{name} must be a URL such as 'http://127.0.0.1:8000', got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in _TO_WS or not parts.netloc:
        raise ValueError(f"{name} must be an http(s):// or ws(s):// URL with a host, got {url!r}")
    return parts


def http_base(url: object, name: str = "url") -> str:
    """Turn a server URL into an http(s) base URL without a trailing slash (``ws://h:1`` -> ``http://h:1``).

    :param url: the server's URL, ``http(s)://`` or ``ws(s)://``.
    :param name: the argument's name, for the error message.
    :raises ValueError: ``url`` is not such a URL.
    """
    parts = _split(url, name)
    return urlunsplit((_TO_HTTP[parts.scheme], parts.netloc, parts.path.rstrip("/"), "", ""))


def ws_url(url: object, path: str, name: str = "url") -> str:
    """Build the WebSocket URL of a path on a server.

    :param url: the server's base (``ws://127.0.0.1:8000``,
        ``http://127.0.0.1:8000/prefix``), or a URL already ending with ``path``.
    :param path: the endpoint (``/v1/nodes``).
    :param name: the argument's name, for the error message.
    :raises ValueError: ``url`` is not an http(s) or ws(s) URL.
    """
    parts = _split(url, name)
    base = parts.path.rstrip("/")
    full = base if base.endswith(path) else base + path
    return urlunsplit((_TO_WS[parts.scheme], parts.netloc, full, parts.query, ""))


def quote_segment(value: str) -> str:
    """Quote a value as one path segment (session ids may hold any character).

    :param value: the segment's text.
    """
    return quote(value, safe="")


def bearer(token: str | None) -> dict[str, str]:
    """Build the ``Authorization`` header of a bearer token.

    :param token: the token, or None for no header.
    :returns: the header as a dict (empty for None).
    :raises ValueError: the token is empty or holds a line break.
    """
    if token is None:
        return {}
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        raise ValueError(f"token must be a non-empty string without line breaks, got {token!r}")
    return {"Authorization": f"Bearer {token}"}
