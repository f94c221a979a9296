"""A deadline on request headers for serve-local's HTTP server (uvicorn has none).

Without it a slowloris client could hold a connection open forever by sending its headers a byte at a time (or
nothing at all).

uvicorn's httptools protocol, subclassed (the ``http`` class uvicorn's config takes): a timer starts when a
connection opens and when each later request's first byte arrives (``on_message_begin``), and stops when that
request's headers are complete (``on_headers_complete``). If it fires first, the client gets a ``408`` and the
connection is closed. Idle keep-alive connections stay uvicorn's (``timeout_keep_alive``) and a slow body is the
request handler's ``--read-timeout``. Guarded like a ToMe patch: without httptools, or with a uvicorn whose protocol
lacks these hooks, the server runs without the deadline and says so.
"""

from __future__ import annotations

import logging
from typing import Any

from deploykit.serve.protocol import error_body

_HOOKS = ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete")


def http_protocol(timeout_s: float) -> Any:
    """The ``http`` setting for uvicorn: httptools' protocol with a header deadline, or ``"auto"`` where it can't be."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is in the serve extra; without it uvicorn falls back to h11
        logging.getLogger("deploykit.serve").info("no header deadline: install httptools (deploykit[serve])")
        return "auto"
    if not all(hasattr(HttpToolsProtocol, h) for h in _HOOKS):
        logging.getLogger("deploykit.serve").info("no header deadline: this uvicorn's protocol has other hooks")
        return "auto"
    return _deadline_class(HttpToolsProtocol, timeout_s)


def _deadline_class(base: type, timeout_s: float) -> type:
    body = error_body(f"the request headers did not arrive within {timeout_s:g} s (--read-timeout); send them at "
                      "once")
    reply = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
             b"content-length: %d\r\n\r\n" % len(body)) + body

    class HeaderDeadline(base):  # type: ignore[misc, valid-type]
        """uvicorn's httptools protocol with a deadline from a request's first byte to the end of its headers."""

        _header_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()  # a client that connects and sends nothing is held no longer than a slow one

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # the first request keeps the deadline set when the connection opened
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(reply)
                self.transport.close()

    return HeaderDeadline
