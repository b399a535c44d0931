"""Redaction for everything the gateway prints about its configuration (``check-config``,
error messages): a secret is shown only by its ``env:NAME``, never by its value."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ("REDACTED", "redact_option", "redact_url")

REDACTED = "<redacted>"
_SECRET_NAMES = ("token", "password", "secret")
_SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", "x-api-key")


def redact_url(url: str) -> str:
    """``scheme://user:pass@host/...`` -> ``scheme://user:<redacted>@host/...``; a lone
    user part (``nats://TOKEN@host``, a token) is redacted whole."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    name, colon, _ = userinfo.partition(":")
    shown = f"{name}:{REDACTED}" if colon else REDACTED
    return urlunsplit(parts._replace(netloc=f"{shown}@{host}"))


def redact_option(name: str, value: object) -> object:
    """An option's value as it may be printed: secrets (``token``, ``password``, secret
    headers) as ``<redacted>`` unless given as ``env:NAME``; URLs without passwords."""
    if isinstance(value, str):
        if value.startswith("env:"):
            return value
        if any(word in name.lower() for word in _SECRET_NAMES):
            return REDACTED
        if "://" in value:
            return redact_url(value)
        return value
    if isinstance(value, dict):
        return {
            k: v
            if str(v).startswith("env:")
            or (k.lower() not in _SECRET_HEADERS and not any(w in k.lower() for w in _SECRET_NAMES))
            else REDACTED
            for k, v in value.items()
        }
    return value
