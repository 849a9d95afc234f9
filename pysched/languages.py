"""Language codes and service names, normalised once at the boundary.

Codes are trimmed, lower-cased, ``_`` becomes ``-``, and the usual aliases
fold to one code (``zh-CN`` -> ``zh``, ``pt-BR`` -> ``pt``, ``iw`` -> ``he``).
Everything past the boundary compares plain strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "AUTO",
    "LANGUAGE_ALIASES",
    "DEFAULT_SERVICES",
    "MAX_SERVICES",
    "normalize_language",
    "normalize_languages",
    "normalize_service",
    "normalize_services",
]

#: ``src="auto"``: any source language; pools are matched on the target alone.
AUTO = "auto"

LANGUAGE_ALIASES: dict[str, str] = {
    "zh-cn": "zh",
    "zh-tw": "zh",
    "zh-hans": "zh",
    "zh-hant": "zh",
    "pt-br": "pt",
    "pt-pt": "pt",
    "en-us": "en",
    "en-gb": "en",
    "in": "id",
    "iw": "he",
}

#: services a job needs when the caller does not say otherwise
DEFAULT_SERVICES = ("asr", "nmt", "tts")
#: distinct service names a scheduler can track (one bit each in a 64-bit mask)
MAX_SERVICES = 64

# a primary subtag of 2-3 letters, then optional subtags (region, script, variant)
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{2,8})*$")
_SERVICE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

# raw input -> normalised code; only valid codes are cached, so the cache is
# bounded by the set of distinct well-formed spellings callers use, and by
# _CACHE_LIMIT entries against a caller that invents new ones forever.
_language_cache: dict[str, str] = {}
_service_cache: dict[str, str] = {}
_CACHE_LIMIT = 65536


def normalize_language(code: object, field: str = "language", *, allow_auto: bool = False) -> str:
    """Return the canonical form of one language code, or raise.

    :param code: the code as given (trimmed, lower-cased, ``_`` -> ``-``, aliases folded).
    :param field: the argument name that error messages name.
    :param allow_auto: accept ``"auto"`` (any source language).
    :raises TypeError: for a non-string.
    :raises ValueError: naming ``field`` and the value, for an empty or
        malformed code, or for ``"auto"`` where it is not allowed.
    """
    cached = _language_cache.get(code) if type(code) is str else None
    if cached is not None:
        if cached == AUTO and not allow_auto:
            raise ValueError(f"{field}: 'auto' is only allowed as a source language")
        return cached
    if not isinstance(code, str):
        raise TypeError(f"{field} must be a str, got {type(code).__name__}: {code!r}")
    text = code.strip().lower().replace("_", "-")
    if text == AUTO:
        if not allow_auto:
            raise ValueError(f"{field}: 'auto' is only allowed as a source language")
        _language_cache[code] = AUTO
        return AUTO
    if not _LANGUAGE_RE.match(text):
        raise ValueError(f"{field}: malformed language code {code!r}")
    text = LANGUAGE_ALIASES.get(text, text)
    if len(_language_cache) < _CACHE_LIMIT:
        _language_cache[code] = text
    return text


def normalize_languages(codes: object, field: str = "languages") -> frozenset[str]:
    """Normalise a non-empty iterable of language codes (not a bare string).

    :param codes: the codes, each as :func:`normalize_language` takes it.
    :param field: the argument name that error messages name.
    :raises TypeError: for a string or a non-iterable, or a non-string code.
    :raises ValueError: for an empty iterable or a malformed code.
    """
    if isinstance(codes, (str, bytes)) or not isinstance(codes, Iterable):
        raise TypeError(f"{field} must be an iterable of language codes, got {type(codes).__name__}: {codes!r}")
    result = frozenset(normalize_language(c, field) for c in codes)
    if not result:
        raise ValueError(f"{field} must name at least one language, got {codes!r}")
    return result


def normalize_service(name: object, field: str = "services") -> str:
    """Return the canonical (trimmed, lower-case) service name, or raise.

    :param name: the service name as given.
    :param field: the argument name that error messages name.
    :raises TypeError: for a non-string.
    :raises ValueError: for a malformed name.
    """
    cached = _service_cache.get(name) if type(name) is str else None
    if cached is not None:
        return cached
    if not isinstance(name, str):
        raise TypeError(f"{field} must hold str names, got {type(name).__name__}: {name!r}")
    text = name.strip().lower()
    if not _SERVICE_RE.match(text):
        raise ValueError(f"{field}: malformed service name {name!r}")
    if len(_service_cache) < _CACHE_LIMIT:
        _service_cache[name] = text
    return text


def normalize_services(names: object, field: str = "services", *, allow_empty: bool = True) -> frozenset[str]:
    """Normalise an iterable of service names (not a bare string).

    :param names: the names, each as :func:`normalize_service` takes it.
    :param field: the argument name that error messages name.
    :param allow_empty: accept an empty iterable.
    :raises TypeError: for a string or a non-iterable, or a non-string name.
    :raises ValueError: for a malformed name, or an empty iterable unless allowed.
    """
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"{field} must be an iterable of service names, got {type(names).__name__}: {names!r}")
    result = frozenset(normalize_service(n, field) for n in names)
    if not result and not allow_empty:
        raise ValueError(f"{field} must name at least one service, got {names!r}")
    return result
