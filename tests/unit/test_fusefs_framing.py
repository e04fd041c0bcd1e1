"""The mount child's framing shortcuts give exactly protocol.encode's bytes, in order."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import pytest
import trio
import trio.testing

from appliance.replication.fusefs import _frames, _FrameWriter
from appliance.replication.protocol import Ack, Hello, Op, OpKind, encode, encode_op_parts

NON_UTF8 = os.fsdecode(b"r\xe9pertoire/\xff\xfe")
OPS = [
    Op(OpKind.WRITE, 3, "a/b", offset=7, data=b"x" * 100),
    Op(OpKind.WRITE, 1, NON_UTF8, offset=1 << 40, data=os.urandom(200_000)),
    Op(OpKind.WRITE, 0, "f", data=os.urandom(32 * 1024)),
    Op(OpKind.WRITE, 0, "f", data=os.urandom(32 * 1024 - 1)),
    Op(OpKind.RENAME, 2, "old", path2=NON_UTF8 + "/new", flags=1),
    Op(OpKind.FSYNC, 0, "", flags=1),
    Op(OpKind.SETATTR, 0, "f", flags=16, mtime_ns=123, uid=5, gid=-1),
]


@pytest.mark.parametrize("op", OPS, ids=lambda op: f"{op.kind.name}-{len(op.data)}")
def test_op_parts_are_the_encoding_with_the_seq(op: Op) -> None:
    parts = encode_op_parts(op, 0x0102030405060708)
    assert b"".join(parts) == encode(replace(op, seq=0x0102030405060708))
    if len(op.data) >= 32 * 1024:
        assert parts[-1] is op.data  # sent from its own buffer, not copied


def test_frames_split_anywhere_decode_in_order() -> None:
    every = [Hello({"a": 1}), *(replace(op, seq=i) for i, op in enumerate(OPS)), Ack(9, True)]
    small = [f for f in every if len(encode(f)) < 1000]

    async def main() -> None:
        for frames, cuts in ((small, (1, 3, 4, 5, 7)), (every, (1000, 70_000, 1 << 30))):
            wire = b"".join(encode(f) for f in frames)
            for cut in cuts:
                send, receive = trio.testing.memory_stream_pair()
                for i in range(0, len(wire), cut):
                    await send.send_all(wire[i:i + cut])
                await send.aclose()
                assert [f async for f in _frames(receive)] == frames

    trio.run(main)


@pytest.mark.parametrize("over_socket", [True, False])
def test_writer_keeps_the_order_of_immediate_and_queued_frames(over_socket: bool) -> None:
    chunks = [os.urandom(n) for n in (10, 300_000, 5, 2_000_000, 77, 1)]

    async def main() -> None:
        if over_socket:
            a, b = socket.socketpair()
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # partial writes
            out: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
            inp: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        else:
            out, inp = trio.testing.memory_stream_pair()
        writer = _FrameWriter(out)
        got = bytearray()

        async def read() -> None:
            while len(got) < sum(map(len, chunks)):
                got.extend(await inp.receive_some(1 << 16))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                for i, chunk in enumerate(chunks):
                    view = memoryview(chunk)
                    writer.send([view[:3], view[3:]], now=i % 2 == 1)
                    if i == 2:
                        await trio.sleep(0.01)
                await read()
                nursery.cancel_scope.cancel()
        assert bytes(got) == b"".join(chunks)
        writer.close()
        writer.send([b"after close"], now=True)  # ignored, never written to a reused fd

    trio.run(main)
