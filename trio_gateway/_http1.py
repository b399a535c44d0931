"""The server side of HTTP/1.1 requests, sans-IO: bytes in, request heads and bodies out.

Parsing is llhttp's (Node.js's parser, through ``httptools``): a request cycle through it costs
about 2 us where h11's event machinery cost 50-90 us (measured with both on the same 18-byte
``POST``), and it is as strict (no bare LF, no obsolete line folding, no spaces before the
colon, duplicate ``Content-Length`` refused). llhttp streams without keeping a buffer of its
own, so the bounds live here: :class:`RequestParser` keeps the unparsed bytes and feeds the
parser no further than the end of the current message, so that a pipelined next request
stays in that buffer (at most ``max_header_size`` bytes of an unfinished head are kept,
whether it trickles in or arrives whole: ``431``; the same for a chunked body's trailers,
plus a few bytes of framing per chunk). A message ends right after its head when
it has no body, after ``Content-Length`` bytes, or, chunked, right after a ``CRLF CRLF``
(the last chunk and the trailers): the feed is cut at each of those points.

What llhttp accepts but h11 (and RFC 9112) refuse is refused here: a version other than 1.0
and 1.1 (``505``), a transfer coding other than ``chunked`` (``501``), a 1.1 request
without exactly one ``Host`` (``400``).
"""

from __future__ import annotations

from collections.abc import Sequence

import httptools

from ._errors import ProtocolError

__all__ = ("BadRequest", "BodyTooLarge", "Request", "RequestParser")

_HEAD_END = b"\r\n\r\n"
_PER_CHUNK = 32
"""Bytes of framing allowed per chunk of a chunked body: its size line, CRLF and a short
extension."""


def _safe_end(buffer: bytearray) -> int:
    """How much of ``buffer`` (which holds no CRLF CRLF) may be parsed without passing the end
    of a message: all but a tail that may be the start of a CRLF CRLF."""
    for keep in (3, 2, 1):
        if buffer.endswith(_HEAD_END[:keep]):
            return len(buffer) - keep
    return len(buffer)


class BadRequest(ProtocolError):
    """The peer sent something that is not acceptable HTTP/1.1; answer ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class BodyTooLarge(ProtocolError):
    """The request body grew past the caller's limit (the rest is not read)."""


class Request:
    """A request's head: header names lowercased, in the order received (``headers``), and
    the last value of each name (``fields``)."""

    __slots__ = ("fields", "headers", "http_version", "method", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        version: bytes,
        fields: dict[bytes, bytes] | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.http_version = version
        self.fields = dict(headers) if fields is None else fields

    def __repr__(self) -> str:
        return f"<Request {self.method!r} {self.target!r} HTTP/{self.http_version.decode()}>"


class RequestParser:
    """One connection's requests, one at a time: :meth:`receive_data`, then :meth:`head`,
    then :meth:`body` until it says the message is complete, then :meth:`next_cycle`."""

    def __init__(self, *, max_header_size: int) -> None:
        self.max_header_size = max_header_size
        self._parser = httptools.HttpRequestParser(self)
        self._buffer = bytearray()
        self.eof = False
        """The peer closed its side (``receive_data(b"")``)."""
        self._start_cycle()

    def _start_cycle(self) -> None:
        self.request: Request | None = None
        self.complete = False
        """The current request (head and body) has been parsed to its end."""
        self.keep_alive = True
        self.expects_continue = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = True
        self._head_size = 0  # bytes of the head parsed so far (llhttp holds their fields)
        self._version = ""  # (these two are read when the head is complete)
        self._method = b""
        self._body: list[bytes] = []
        self.body_size = 0
        self.content_length: int | None = None
        """The head's ``Content-Length`` (``None``: none, or chunked)."""
        self._body_left = 0  # bytes of a Content-Length body still to feed
        self._chunked = False  # (with it, _chunks and _framing: see _check_coding)

    # -- httptools' callbacks -------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # (not a chunked body's trailers)
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # read now: llhttp resets these once the message is complete
        parser = self._parser
        self._in_head = False
        self._version = parser.get_http_version()
        self._method = parser.get_method()
        self.keep_alive = parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self.body_size += len(body)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        self.complete = True

    # -- the connection's side ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` when it closed its side."""
        if data:
            self._buffer += data
        else:
            self.eof = True

    @property
    def started(self) -> bool:
        """Whether a request had begun (bytes of it received) and is not complete."""
        return not self.complete and (
            self.request is not None or self._head_size > 0 or bool(self._buffer.strip())
        )

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._buffer)

    def _feed(self, end: int) -> None:
        """Parse the first ``end`` buffered bytes (through a view: no copy of them)."""
        buffer = self._buffer
        try:
            if end == len(buffer):
                self._parser.feed_data(buffer)
            else:
                with memoryview(buffer) as view:
                    self._parser.feed_data(view[:end])
        except httptools.HttpParserUpgrade:
            # An upgrade (or CONNECT) we do not speak: the request stands, without a body;
            # whatever follows is not HTTP/1.1, so the connection closes after the answer.
            self.complete = True
            self.keep_alive = False
        except httptools.HttpParserError as exc:
            raise BadRequest(str(exc) or "malformed request") from exc
        finally:
            del buffer[:end]

    def head(self) -> Request | None:
        """The next request's head, once all of it is buffered; ``None`` until then. Raises
        :class:`BadRequest`: ``431`` past ``max_header_size``, ``400`` if malformed (or the
        peer closed inside it), ``501``/``505`` for a coding/version we do not serve."""
        if self.request is not None:
            return self.request
        buffer = self._buffer
        while self._in_head:
            end = buffer.find(_HEAD_END)
            if end < 0:
                # Not all of it yet: parse what cannot reach its end (errors show at once).
                if self._head_size + len(buffer) > self.max_header_size:
                    raise BadRequest("request header fields too large", 431)
                end = _safe_end(buffer) if buffer else 0
                if end:
                    self._head_size += end
                    self._feed(end)
                if self.eof and self.started:
                    raise BadRequest("connection closed inside the request head")
                return None
            end += len(_HEAD_END)
            self._head_size += end
            if self._head_size > self.max_header_size:
                raise BadRequest("request header fields too large", 431)
            self._feed(end)  # (only empty lines before a request leave it in the head)
        self.request = self._judge_head()
        return self.request

    def _judge_head(self) -> Request:
        version = self._version
        if version not in ("1.1", "1.0"):
            raise BadRequest(f"HTTP/{version} not supported", 505)
        headers = self._headers
        fields = dict(headers)  # the last value of each name, looked up at C speed
        if len(fields) == len(headers):  # no name twice (the usual case)
            hosts = int(b"host" in fields)
            coding = fields.get(b"transfer-encoding")
            if coding is not None:
                self._check_coding(coding)
        else:  # every Host and every Transfer-Encoding counts
            hosts = 0
            for name, value in headers:
                if name == b"host":
                    hosts += 1
                elif name == b"transfer-encoding":
                    self._check_coding(value)
        if hosts != 1 and (version == "1.1" or hosts):
            raise BadRequest("a request needs exactly one Host header")
        length = fields.get(b"content-length")
        if length is not None:
            self._body_left = self.content_length = int(length)  # digits: llhttp checked them
        if self.complete:
            self._body_left = 0  # no body after all (an upgrade)
        # (HTTP/1.0's keep-alive, an extension, is not offered: as h11, one request per
        # connection)
        http11 = version == "1.1"
        self.keep_alive = self.keep_alive and http11
        expect = fields.get(b"expect")
        self.expects_continue = (
            http11 and expect is not None and expect.strip().lower() == b"100-continue"
        )
        return Request(self._method, self._url, headers, version.encode(), fields)

    def _check_coding(self, coding: bytes) -> None:
        if coding.strip().lower() != b"chunked":
            raise BadRequest(f"transfer coding {coding!r} not supported", 501)
        self._chunked = True
        self._chunks = 0
        self._framing = 0  # bytes of a chunked body fed that were not body: sizes, trailers

    def body(self, max_size: int) -> bool:
        """Parse the buffered part of the body; True once the message is complete. Raises
        :class:`BodyTooLarge` past ``max_size`` bytes, :class:`BadRequest` if malformed or the
        peer closed inside it."""
        buffer = self._buffer
        while not self.complete and buffer:
            if self._chunked:
                # A chunked message can only end right after a CRLF CRLF: feed up to the next
                # one, or what cannot reach one.
                end = buffer.find(_HEAD_END)
                end = _safe_end(buffer) if end < 0 else end + len(_HEAD_END)
                if not end:
                    break
                before = self.body_size
                self._feed(end)
                # Trailer fields are held by llhttp until each is complete: bound them, with
                # the chunk sizes, as a head is bounded (plus a few bytes a chunk).
                self._framing += end - (self.body_size - before)
                if self._framing > self.max_header_size + _PER_CHUNK * self._chunks:
                    raise BadRequest("chunked framing or trailers too large", 431)
            else:
                end = min(len(buffer), self._body_left)
                self._body_left -= end
                self._feed(end)
            if self.body_size > max_size:
                raise BodyTooLarge(f"body over {max_size} bytes")
        if not self.complete and self.eof:
            raise BadRequest("connection closed inside the request body")
        return self.complete

    def take_body(self) -> bytes:
        """The body parsed so far (all of it once :meth:`body` returned True)."""
        parts = self._body
        self._body = []
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def next_cycle(self) -> None:
        """Forget the complete current request; the next one may begin."""
        assert self.complete, "the current request is not complete"
        self._start_cycle()
