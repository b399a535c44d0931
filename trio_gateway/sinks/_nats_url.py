"""What a ``nats://`` URL says: servers, credentials, TLS, the subject, and for the sink the
stream to expect or create (``nats://user:pass@host:4222,host2/subject?stream=NAME&create=true``).
The NATS source's URL is the same with a subject that may have wildcards and only the
connection's options (``creds``, ``tls``, ``ca``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from .._errors import ConfigurationError
from .._secrets import redact_url

__all__ = ("DEFAULT_PORT", "NatsTarget", "parse_nats_url")

DEFAULT_PORT = 4222
_CONNECTION_KEYS = ("creds", "tls", "ca")
_QUERY_KEYS = ("stream", "create", "storage", "replicas", "duplicate_window", *_CONNECTION_KEYS)


@dataclass(frozen=True, slots=True)
class NatsTarget:
    """What a ``nats://`` sink URL says: servers, subject, the stream to expect or create."""

    servers: tuple[str, ...]
    """``nats://host:port`` for each server given (several seed a cluster connection)."""
    subject: str
    stream: str | None = None
    """Publishes are checked against it (``Nats-Expected-Stream``); created when ``create``."""
    create: bool = False
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    duplicate_window: float = 120.0
    """Seconds JetStream remembers a ``Nats-Msg-Id`` (only used when creating the stream)."""
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    """Path of a NATS ``.creds`` file (JWT + NKey), the usual credentials of a NATS deployment."""
    tls: bool = False
    ca: str | None = None


def _bool(value: str, key: str, where: str, what: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(where, f"{what}: {key} must be true or false, got {value!r}")


def _subscription_subject(subject: str) -> bool:
    """A subject to subscribe to: tokens, ``*`` for one, ``>`` (last) for the rest."""
    tokens = subject.split(".")
    return all(tokens) and all(
        (token == ">" and i == len(tokens) - 1) or token == "*" or not set(token) & set("*>")
        for i, token in enumerate(tokens)
    )


def _server(hostport: str, where: str, what: str) -> str:
    host, sep, port_text = hostport.rpartition(":")
    if not sep or (hostport.startswith("[") and hostport.endswith("]")):
        host, port_text = hostport, str(DEFAULT_PORT)
    if not host.strip("[]"):
        raise ConfigurationError(where, f"{what}: empty host in {hostport!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigurationError(where, f"{what}: bad port in {hostport!r}") from None
    if not 0 < port <= 65535:
        raise ConfigurationError(where, f"{what}: port out of range in {hostport!r}")
    return f"nats://{host}:{port}"


def parse_nats_url(url: str, *, subscribe: bool = False) -> NatsTarget:
    """Parse ``nats://[user:password@|token@]host[:port][,host[:port]...]/SUBJECT[?options]``.

    Options: ``stream=NAME``, ``create=true`` (create the stream for SUBJECT if it is missing),
    ``storage=file|memory``, ``replicas=N``, ``duplicate_window=SECONDS``, ``creds=PATH``,
    ``tls=true``, ``ca=PATH``. Every error is a :class:`ConfigurationError` naming ``sink``.

    ``subscribe=True`` parses a NATS source's URL: the subject may have wildcards, ``tls://``
    means ``tls=true``, the options are ``creds``, ``tls`` and ``ca``, and an error names
    ``nats.url``.
    """
    where, what = ("nats.url", "nats source") if subscribe else ("sink", "nats sink")
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls") or (parts.scheme == "tls" and not subscribe):
        raise ConfigurationError(
            where, f"{what} URL must start with nats://, got {redact_url(url)!r}"
        )
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ConfigurationError(where, f"{what} needs a host: {redact_url(url)!r}")
    servers = tuple(_server(h, where, what) for h in hosts.split(","))
    subject = unquote(parts.path.lstrip("/"))
    if subscribe:
        if any(c in subject for c in " \t\r\n/") or not _subscription_subject(subject):
            raise ConfigurationError(
                where, f"{what} needs a subject after the host: {redact_url(url)!r}"
            )
    elif not subject or any(c in subject for c in " \t\r\n*>") or "/" in subject:
        raise ConfigurationError(
            where,
            f"{what} needs one literal subject after the host (no * or >): {redact_url(url)!r}",
        )
    elif ".." in subject or subject.startswith(".") or subject.endswith("."):
        raise ConfigurationError(where, f"{what}: malformed subject {subject!r}")
    user = password = token = None
    if userinfo:
        name, colon, secret = userinfo.partition(":")
        if colon:
            user, password = unquote(name), unquote(secret)
        else:
            token = unquote(name)
    keys = _CONNECTION_KEYS if subscribe else _QUERY_KEYS
    options: dict[str, Any] = {"tls": True} if parts.scheme == "tls" else {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key not in keys:
            beside = " (the other options go beside the url: stream = ...)" if subscribe else ""
            raise ConfigurationError(
                where,
                f"{what}: unknown option {key!r} (expected one of {', '.join(keys)}){beside}",
            )
        if key in ("create", "tls"):
            options[key] = _bool(value, key, where, what)
        elif key == "storage":
            if value not in ("file", "memory"):
                raise ConfigurationError(
                    "sink", f"nats sink: storage must be file or memory, got {value!r}"
                )
            options[key] = value
        elif key == "replicas":
            if not value.isdigit() or not 1 <= int(value) <= 5:
                raise ConfigurationError(
                    "sink", f"nats sink: replicas must be 1 to 5, got {value!r}"
                )
            options[key] = int(value)
        elif key == "duplicate_window":
            try:
                window = float(value)
            except ValueError:
                window = -1.0
            if not 0 < window <= 86400:
                raise ConfigurationError(
                    "sink",
                    f"nats sink: duplicate_window must be 0 < seconds <= 86400, got {value!r}",
                )
            options[key] = window
        elif key == "stream":
            if not value or any(c in value for c in " \t.*>/\\"):
                raise ConfigurationError("sink", f"nats sink: bad stream name {value!r}")
            options[key] = value
        else:
            options[key] = value
    if options.get("create") and not options.get("stream"):
        raise ConfigurationError("sink", "nats sink: create=true needs stream=NAME")
    return NatsTarget(
        servers=servers, subject=subject, user=user, password=password, token=token, **options
    )
