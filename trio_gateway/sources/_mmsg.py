"""Many datagrams per system call: Linux ``recvmmsg(2)`` through :mod:`ctypes`.

Python's socket module has ``recvfrom`` (one datagram a call) and no ``recvmmsg``, and no
maintained package on PyPI provides it, so this module calls libc's. One call fills up to
``slots`` preallocated buffers; what Python then does per datagram is one ``bytes`` copy out
of its slot. A sender's address is formatted once per call, not once per datagram (CPython's
``recvfrom`` builds an address tuple through ``inet_ntop`` and ``sprintf`` for each one).

The figures, and why the UDP source still uses ``recvfrom`` for datagrams over 3 KiB, are in
docs/design.md ("UDP").

Only the layouts of ``struct iovec``, ``struct msghdr`` and ``struct mmsghdr`` are assumed,
as the kernel defines them (``size_t`` lengths, as glibc and musl both present them).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import sys
from collections.abc import Callable

__all__ = ("MultiReceiver", "available")

_UNAVAILABLE = frozenset({errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL})
"""Errors that say the call cannot work here (a seccomp filter, an emulator, a kernel without
it, a structure layout it refuses), as opposed to one datagram's trouble."""

_MSG_DONTWAIT = 0x40
_NAME_SIZE = 28
"""Room for the largest address: ``struct sockaddr_in6``."""


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _load() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).recvmmsg
    except (OSError, AttributeError):
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    function.restype = ctypes.c_int
    return function


_recvmmsg = _load()


def available() -> bool:
    """Whether this platform has ``recvmmsg`` (Linux)."""
    return _recvmmsg is not None


def format_address(name: bytes) -> str:
    """``host:port`` (IPv6 in brackets) of a raw ``sockaddr_in``/``sockaddr_in6``."""
    family = int.from_bytes(name[:2], sys.byteorder)
    port = int.from_bytes(name[2:4], "big")
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, name[4:8])}:{port}"
    if family == socket.AF_INET6:
        host = socket.inet_ntop(socket.AF_INET6, name[8:24])
        scope = int.from_bytes(name[24:28], sys.byteorder)
        if scope:  # as recvfrom shows it: fe80::1%eth0
            flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
            host = socket.getnameinfo((host, port, 0, scope), flags)[0]
        return f"[{host}]:{port}"
    return name.hex()


class MultiReceiver:
    """``slots`` receive buffers of ``slot_size`` bytes each, for one socket.

    :meth:`receive` returns the datagrams of one ``recvmmsg`` call as a dict of raw sender
    address to payloads (each sender's in arrival order); a datagram longer than
    ``slot_size - 1`` bytes (cut by the kernel) is counted, not returned. Memory:
    ``slots * slot_size`` bytes, touched only as far as datagrams fill them.
    """

    def __init__(self, sock: socket.socket, *, slots: int, slot_size: int) -> None:
        if _recvmmsg is None:
            raise OSError(errno.ENOSYS, "recvmmsg is not available on this platform")
        self._fd = sock.fileno()
        self.slots = slots
        self._slot_size = slot_size
        # An anonymous mapping, not a bytearray: its pages are zero-filled by the kernel when
        # first written, so a slot costs memory only as far as datagrams have filled it.
        self._data = mmap.mmap(-1, slots * slot_size)
        self._names = bytearray(slots * _NAME_SIZE)
        data = (ctypes.c_char * len(self._data)).from_buffer(self._data)
        names = (ctypes.c_char * len(self._names)).from_buffer(self._names)
        self._iovecs = (_Iovec * slots)()
        self._headers = (_Mmsghdr * slots)()
        for i in range(slots):
            self._iovecs[i].iov_base = ctypes.addressof(data) + i * slot_size
            self._iovecs[i].iov_len = slot_size
            header = self._headers[i].msg_hdr
            header.msg_name = ctypes.addressof(names) + i * _NAME_SIZE
            header.msg_namelen = _NAME_SIZE
            header.msg_iov = ctypes.addressof(self._iovecs[i])
            header.msg_iovlen = 1
        self._keep = (data, names)
        self._stride = ctypes.sizeof(_Mmsghdr)
        # The kernel rewrites each used header's msg_namelen and msg_len: one copy of the
        # pristine headers puts them back after every call.
        self._header_bytes = memoryview(self._headers).cast("B")
        self._pristine = bytes(self._header_bytes)
        self._words = self._header_bytes.cast("I")
        self._len_index = _Mmsghdr.msg_len.offset // 4
        self._namelen_index = (_Mmsghdr.msg_hdr.offset + _Msghdr.msg_namelen.offset) // 4
        self.last_length = -1
        """The length of the last datagram :meth:`receive` took."""
        self.failure: OSError | None = None
        """Set when ``recvmmsg`` failed in a way that says it cannot work here; the caller
        then reads with ``recvfrom``."""
        self._data_view = memoryview(self._data)
        self._names_view = memoryview(self._names)

    def receive(self) -> tuple[dict[bytes, list[bytes]], int, int]:
        """One call's datagrams by raw sender address, how many of them were oversize, and
        how many the call took in all (0 when nothing is waiting).

        Raises :class:`OSError` for errors other than ``EAGAIN``, after setting
        :attr:`failure` if the error says that ``recvmmsg`` cannot work here.
        """
        assert _recvmmsg is not None
        count = _recvmmsg(self._fd, self._headers, self.slots, _MSG_DONTWAIT, None)
        if count <= 0:
            if count < 0:
                code = ctypes.get_errno()
                if code not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    error = OSError(code, os.strerror(code))
                    if code in _UNAVAILABLE:
                        self.failure = error
                    raise error
            return {}, 0, 0
        step = self._stride // 4
        words = self._words
        lengths = words[self._len_index : count * step : step].tolist()
        self.last_length = lengths[-1]
        name_lengths = words[self._namelen_index : count * step : step].tolist()
        self._header_bytes[: count * self._stride] = self._pristine[: count * self._stride]
        data, names = self._data_view, self._names_view
        size, limit = self._slot_size, self._slot_size - 1
        senders: dict[bytes, list[bytes]] = {}
        get = senders.get
        oversize = 0
        start = 0
        name_start = 0
        for length, name_length in zip(lengths, name_lengths, strict=True):
            if length > limit:
                oversize += 1
            else:
                payload = bytes(data[start : start + length])
                sender = bytes(names[name_start : name_start + name_length])
                payloads = get(sender)
                if payloads is None:
                    senders[sender] = [payload]
                else:
                    payloads.append(payload)
            start += size
            name_start += _NAME_SIZE
        return senders, oversize, count
