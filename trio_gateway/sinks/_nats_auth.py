"""The credentials fields of a NATS ``CONNECT``: user and password, token, or a ``.creds`` file.

A ``.creds`` file holds a user JWT and an NKey seed; the client proves it holds the seed by
signing the server's ``nonce`` with it (Ed25519). The seed is decoded here (base32, two prefix
bytes, 32 bytes of key, a CRC16) and signed with ``cryptography``, imported only when a
``.creds`` file is used.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from ._nats_protocol import NatsError
from ._nats_url import NatsTarget

__all__ = ("credentials", "seed_private_bytes")

_BLOCK = re.compile(
    rb"-{3,}[^\n]*BEGIN[^\n]*-{3,}\s*\n\s*(\S+)\s*\n\s*-{3,}[^\n]*END[^\n]*-{3,}", re.MULTILINE
)


def _crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum at the end of an NKey."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def seed_private_bytes(seed: bytes) -> bytes:
    """The 32-byte Ed25519 private key in an NKey seed (``SU...``); ValueError if malformed."""
    text = seed.strip()
    raw = base64.b32decode(text + b"=" * (-len(text) % 8))
    if len(raw) != 36:
        raise ValueError("an NKey seed decodes to 36 bytes")
    body, checksum = raw[:-2], int.from_bytes(raw[-2:], "little")
    if _crc16(body) != checksum:
        raise ValueError("NKey seed checksum mismatch")
    if (body[0] & 0xF8) != 18 << 3:  # 'S': a seed
        raise ValueError("not an NKey seed")
    return body[2:]


def credentials(target: NatsTarget, nonce: str | None) -> dict[str, Any]:
    """The auth fields of ``CONNECT`` for what the URL gives (:class:`NatsError` if a
    ``.creds`` file cannot be used)."""
    fields: dict[str, Any] = {}
    if target.user is not None:
        fields["user"], fields["pass"] = target.user, target.password
    if target.token is not None:
        fields["auth_token"] = target.token
    if target.creds is not None:
        try:
            with open(target.creds, "rb") as file:
                blocks = _BLOCK.findall(file.read())
        except OSError as exc:
            raise NatsError(f"cannot read creds {target.creds!r}: {exc}") from exc
        if len(blocks) < 2:
            raise NatsError(f"{target.creds!r} is not a .creds file (JWT and seed)")
        if nonce is None:
            raise NatsError("the server sent no nonce to sign for the creds")
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        except ImportError as exc:
            raise NatsError(f"creds need the cryptography package: {exc}") from exc
        try:
            key = Ed25519PrivateKey.from_private_bytes(seed_private_bytes(blocks[1]))
        except ValueError as exc:
            raise NatsError(f"bad seed in {target.creds!r}: {exc}") from exc
        signature = key.sign(nonce.encode())
        fields["jwt"] = blocks[0].decode()
        fields["sig"] = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    return fields
