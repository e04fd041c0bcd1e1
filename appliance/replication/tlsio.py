"""TLS for the replication data path: one TLS object on memory buffers, two ways to move its
bytes (a blocking socket shared by threads, or a trio socket).

Why not `ssl.SSLSocket`: one OpenSSL object must not be used by two threads at the same time,
and the secondary reads frames in one thread while another sends its acknowledgements. Why not
trio's SSLStream: it costs a trip through trio's scheduler and its Python state machine for
every 16 KiB TLS record (measured: the largest CPU cost of receiving a 1 GiB stream, and about
0.1 ms per 4 KiB frame sent).

So the TLS object works on memory buffers (`SSLContext.wrap_bio`, as trio does) behind a lock
held only for the short calls into it (`_TlsCore`), and the socket I/O happens outside: a read
takes what the socket has (up to RECEIVE_BYTES) and every complete record of it is decrypted
in one go; a send encrypts and writes under a send lock, so that records leave in the order
they were made.

- `BlockingTls` (the secondary): a blocking socket; `receive()` in one thread while `send()`
  is called from others.
- `TrioTls` (the primary's sender): a trio.abc.Stream over a trio SocketStream, raising
  trio.BrokenResourceError for a failed transport or TLS error as SSLStream does.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

T = TypeVar("T")

RECEIVE_BYTES = 256 * 1024
READ_BYTES = 1 << 20  # plaintext taken out of the TLS object per call
SEND_TIMEOUT_S = 10  # a blocking send stuck this long (peer gone or wedged) fails
CLOSE_TIMEOUT_S = 1.0


class _TlsCore:
    """The TLS object and its two memory buffers; every method is short and does no I/O.

    What the TLS object produces waits in the outgoing buffer, in the order it was made, until
    a sender takes it: the caller must send what `encrypt`, `pending_out` and `goodbye`
    return before another sender takes the next (hence the send locks below). A record made
    while reading (a TLS 1.3 key update answered) then leaves before any made after it."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side,
                                     server_hostname=server_hostname)
        self._lock = threading.Lock()
        self.eof = False

    def handshake_step(self) -> bool:
        """One handshake step (then send `pending_out()`): whether it is complete;
        ssl.SSLError if it failed."""
        with self._lock:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return False
            return True

    def pending_out(self) -> bytes:
        with self._lock:
            return self._out.read()

    def encrypt(self, *parts: bytes) -> bytes:
        """The records of parts, in order (a large part is read in place, not copied)."""
        with self._lock:
            for part in parts:
                self._tls.write(part)
            return self._out.read()

    def feed(self, data: bytes) -> None:
        """Bytes from the socket; b"" is its end."""
        with self._lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()

    def decrypt(self) -> tuple[list[bytes], bool]:
        """The plaintext of every complete record fed so far, and whether something must be
        sent back (`pending_out`: a TLS 1.3 key update answered while reading, normally
        nothing). Notes a clean or unclean end of the session in `eof`; other TLS errors
        raise ssl.SSLError."""
        parts: list[bytes] = []
        with self._lock:
            while True:
                try:
                    chunk = self._tls.read(READ_BYTES)
                except ssl.SSLWantReadError:
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self.eof = True
                    break
                if not chunk:
                    self.eof = True
                    break
                parts.append(chunk)
            return parts, bool(self._out.pending)

    def goodbye(self) -> bytes:
        """The close_notify to send (the peer's is not waited for)."""
        with self._lock:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._tls.unwrap()
            return self._out.read()

    def getpeercert(self) -> dict[str, object] | None:
        return self._tls.getpeercert()  # type: ignore[return-value]


class BlockingTls:
    """One TLS session over a connected blocking socket (which it owns)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.sock = sock  # reads (its timeout is the reader's)
        # Writes go through a second socket object on a dup of the descriptor: a read timeout
        # set for the reader must not cut a long send short in another thread.
        self._wsock = socket.socket(fileno=os.dup(sock.fileno()))
        self._wsock.settimeout(None)
        self._core = _TlsCore(context, server_side=server_side, server_hostname=server_hostname)
        self._send_lock = threading.Lock()  # encrypt + write: records leave in order
        self._timeout: float | None = sock.gettimeout()
        # A peer that stopped reading must not hold a sender forever (acks are tiny; a full
        # send buffer for this long means the peer is gone or wedged).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))

    def handshake(self, timeout_s: float) -> None:
        """Complete the TLS handshake within timeout_s (TimeoutError, ssl.SSLError, OSError
        otherwise). The socket is left blocking without a timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            done = self._core.handshake_step()
            self._flush()
            if done:
                break
            self._fill(deadline)
        self._set_timeout(None)

    def getpeercert(self) -> dict[str, object] | None:
        return self._core.getpeercert()

    def receive(self, timeout_s: float | None = None) -> bytes:
        """The plaintext of the complete records available after one socket read (at least
        one byte); b"" once the peer closed the session. TimeoutError after timeout_s with
        nothing complete. Only one thread may receive."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            parts, pending = self._core.decrypt()
            if pending:
                self._flush()
            if parts:
                return b"".join(parts)
            if self._core.eof:
                return b""
            self._fill(deadline)

    def send(self, data: bytes) -> None:
        """Encrypt and write all of data (blocking; any thread)."""
        with self._send_lock:
            self._wsock.sendall(self._core.encrypt(data))

    def shutdown_read(self) -> None:
        """Make a receive() blocked in another thread return (b"" or an error) soon."""
        with contextlib.suppress(OSError):  # not connected any more: its reader sees that
            self.sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Say goodbye (TLS close_notify, best effort) and close the socket."""
        with contextlib.suppress(OSError), self._send_lock:
            self._wsock.sendall(self._core.goodbye())
        for sock in (self._wsock, self.sock):
            with contextlib.suppress(OSError):
                sock.close()

    def _fill(self, deadline: float | None) -> None:
        """One socket read into the TLS object's input."""
        # Never 0: that would make the socket non-blocking (BlockingIOError, not a timeout).
        self._set_timeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        self._core.feed(self.sock.recv(RECEIVE_BYTES))  # TimeoutError past the deadline

    def _flush(self) -> None:
        with self._send_lock:
            out = self._core.pending_out()
            if out:
                self._wsock.sendall(out)

    def _set_timeout(self, timeout: float | None) -> None:
        # Only when it changes: each settimeout is two fcntl calls.
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout


class TrioTls(trio.abc.Stream):
    """A TLS client stream over a trio SocketStream: one task may send while another
    receives."""

    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext, *,
                 server_hostname: str) -> None:
        self.transport_stream = transport
        self._core = _TlsCore(context, server_side=False, server_hostname=server_hostname)
        # Records leave in the order they were made: one send at a time. Not a trio.Lock:
        # its acquire is a round through the scheduler even when free, and the writer task
        # is nearly always the only one sending.
        self._sending = False
        self._sent = trio.Event()
        self._waiting = 0

    async def do_handshake(self) -> None:
        while True:
            done = self._guard(self._core.handshake_step)
            await self._write(())
            if done:
                return
            await self._fill()

    def getpeercert(self) -> dict[str, object] | None:
        return self._core.getpeercert()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._write((bytes(data),))

    async def send_parts(self, parts: Sequence[bytes]) -> None:
        """send_all(b"".join(parts)) without the join."""
        await self._write(tuple(parts))

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Every complete record's plaintext after one transport read (max_bytes is not a
        limit here); b"" at the end of the session."""
        while True:
            parts, pending = self._guard(self._core.decrypt)
            if pending:
                await self._write(())
            if parts:
                return b"".join(parts)
            if self._core.eof:
                return b""
            await self._fill()

    async def aclose(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT_S), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            await self._write((), goodbye=True)
        await self.transport_stream.aclose()

    async def _fill(self) -> None:
        self._core.feed(await self.transport_stream.receive_some(RECEIVE_BYTES))

    async def _write(self, parts: tuple[bytes, ...], *, goodbye: bool = False) -> None:
        """Encrypt parts and send, with whatever the TLS object made before them (nothing to
        encrypt: only that)."""
        while self._sending:
            self._waiting += 1
            try:
                await self._sent.wait()
            finally:
                self._waiting -= 1
        self._sending = True
        try:
            # Taken from the TLS object only now, with the stream ours: records leave in the
            # order they were made.
            if goodbye:
                out = self._core.goodbye()
            elif parts:
                out = self._guard(self._core.encrypt, *parts)
            else:
                out = self._core.pending_out()
            if out:
                await self.transport_stream.send_all(out)
        finally:
            self._sending = False
            if self._waiting:
                self._sent.set()
                self._sent = trio.Event()

    @staticmethod
    def _guard(fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS: {e}") from e
