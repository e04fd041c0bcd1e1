"""TLS over a blocking socket for the replication data path, usable from two threads at once.

Why not `ssl.SSLSocket`: one OpenSSL object must not be used by two threads at the same time,
and the secondary reads frames in one thread while another sends its acknowledgements. Why not
trio's SSLStream: it costs a trip through trio's scheduler and its Python state machine for
every 16 KiB TLS record (measured: the largest CPU cost of receiving a 1 GiB stream).

So the TLS object works on memory buffers (`SSLContext.wrap_bio`), as trio does, and the
socket I/O happens outside its lock: `receive()` reads what the socket has (up to
RECEIVE_BYTES) and decrypts every complete record of it in one go; `send()` encrypts and
writes under a send lock, so that records leave in the order they were made. Both may be
called concurrently, from different threads.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
import time

RECEIVE_BYTES = 256 * 1024
READ_BYTES = 1 << 20  # plaintext taken out of the TLS object per call
SEND_TIMEOUT_S = 10


class TlsClosed(ConnectionError):
    """The peer ended the TLS session (close_notify or a plain end of the TCP stream)."""


class BlockingTls:
    """One TLS session over a connected blocking socket (which it owns)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.sock = sock  # reads (its timeout is the reader's)
        # Writes go through a second socket object on a dup of the descriptor: a read timeout
        # set for the reader must not cut a long send short in another thread.
        self._wsock = socket.socket(fileno=os.dup(sock.fileno()))
        self._wsock.settimeout(None)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        self._lock = threading.Lock()  # the TLS object: short calls, no I/O under it
        self._send_lock = threading.Lock()  # encrypt + write: records leave in order
        self._eof = False
        self._timeout: float | None = sock.gettimeout()
        # A peer that stopped reading must not hold a sender forever (acks are tiny; a full
        # send buffer for this long means the peer is gone or wedged).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))

    # -- handshake

    def handshake(self, timeout_s: float) -> None:
        """Complete the TLS handshake within timeout_s (socket.timeout, ssl.SSLError, OSError
        otherwise). The socket is left blocking without a timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                self._flush()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill(deadline)
        self._set_timeout(None)

    def getpeercert(self) -> dict[str, object] | None:
        return self._tls.getpeercert()  # type: ignore[return-value]

    # -- data

    def receive(self, timeout_s: float | None = None) -> bytes:
        """The plaintext of the complete records available after one socket read (at least
        one byte); b"" once the peer closed the session. TimeoutError after timeout_s with
        nothing complete. Only one thread may receive."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            parts = self._decrypt()
            if parts:
                return b"".join(parts)
            if self._eof:
                return b""
            self._fill(deadline)

    def send(self, data: bytes) -> None:
        """Encrypt and write all of data (blocking; any thread)."""
        with self._send_lock:
            with self._lock:
                self._tls.write(data)
                out = self._out.read()
            self._wsock.sendall(out)

    def shutdown_read(self) -> None:
        """Make a receive() blocked in another thread return (b"" or an error) soon."""
        with contextlib.suppress(OSError):  # not connected any more: its reader sees that
            self.sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Say goodbye (TLS close_notify, best effort) and close the socket."""
        with contextlib.suppress(OSError, ValueError):
            with self._lock, contextlib.suppress(ssl.SSLWantReadError):
                self._tls.unwrap()  # the peer's close_notify is not waited for
            self._flush()
        for sock in (self._wsock, self.sock):
            with contextlib.suppress(OSError):
                sock.close()

    # -- inner workings

    def _decrypt(self) -> list[bytes]:
        parts: list[bytes] = []
        with self._lock:
            while True:
                try:
                    chunk = self._tls.read(READ_BYTES)
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._eof = True
                    break
                if not chunk:
                    self._eof = True
                    break
                parts.append(chunk)
            pending = self._out.pending  # a TLS 1.3 key update answered while reading
        if pending:
            self._flush()
        return parts

    def _fill(self, deadline: float | None) -> None:
        """One socket read into the TLS object's input (EOF noted)."""
        self._set_timeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
        data = self.sock.recv(RECEIVE_BYTES)  # TimeoutError past the deadline
        with self._lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
        if not data:
            self._eof = True

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                out = self._out.read()
            if out:
                self._wsock.sendall(out)

    def _set_timeout(self, timeout: float | None) -> None:
        # Only when it changes: each settimeout is two fcntl calls.
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout
