"""BlockingTls over a real loopback TCP connection with the cluster's certificates: one thread
receiving while two others send on the same session, every byte in order; the frame parser
fed in arbitrary pieces."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from appliance.replication import tls
from appliance.replication.channel import _FrameParser
from appliance.replication.protocol import Ack, Op, OpKind, ProtocolError, encode, encode_op
from appliance.replication.tlsio import BlockingTls

TIMEOUT_S = 10.0


def connected_pair(pki: Path) -> tuple[BlockingTls, BlockingTls]:
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S)
    server_sock, _ = listener.accept()
    listener.close()
    server = BlockingTls(server_sock, tls.server_context(pki, "node2"), server_side=True)
    client = BlockingTls(client_sock, tls.client_context(pki, "node1", "node2"),
                         server_side=False, server_hostname="node2")
    errors: list[BaseException] = []

    def handshake() -> None:
        try:
            server.handshake(TIMEOUT_S)
        except BaseException as e:  # reported in the test's thread
            errors.append(e)

    t = threading.Thread(target=handshake)
    t.start()
    client.handshake(TIMEOUT_S)
    t.join(TIMEOUT_S)
    assert not errors, errors
    return server, client


def receive_exactly(conn: BlockingTls, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.receive(TIMEOUT_S)
        assert chunk, f"session ended after {len(data)} of {size} bytes"
        data += chunk
    return data


def test_handshake_names_the_peer(pki: Path) -> None:
    server, client = connected_pair(pki)
    try:
        assert tls.peer_node_name(server.getpeercert()) == "node1"
        assert tls.peer_node_name(client.getpeercert()) == "node2"
    finally:
        server.close()
        client.close()


def test_two_senders_and_a_reader_at_once_keep_every_message_whole(pki: Path) -> None:
    server, client = connected_pair(pki)
    count, size = 300, 5000
    received: list[bytes] = []

    def read_all() -> None:
        received.append(receive_exactly(client, 2 * count * size))

    def send(tag: bytes) -> None:
        for i in range(count):
            server.send(tag + i.to_bytes(4, "big") + b"x" * (size - 5))

    try:
        reader = threading.Thread(target=read_all)
        senders = [threading.Thread(target=send, args=(t,)) for t in (b"A", b"B")]
        reader.start()
        for s in senders:
            s.start()
        # Meanwhile the other direction carries data too: the reader's session is busy both ways.
        client.send(b"ping" * 1000)
        assert receive_exactly(server, 4000) == b"ping" * 1000
        for s in senders:
            s.join(TIMEOUT_S)
        reader.join(TIMEOUT_S)
        data = received[0]
        messages = [data[i:i + size] for i in range(0, len(data), size)]
        for tag in (b"A", b"B"):
            seqs = [int.from_bytes(m[1:5], "big") for m in messages if m[:1] == tag]
            assert seqs == list(range(count))  # whole, and in each sender's order
    finally:
        server.close()
        client.close()


def test_receive_times_out_then_sees_the_close(pki: Path) -> None:
    server, client = connected_pair(pki)
    try:
        with pytest.raises(TimeoutError):
            server.receive(0.05)
        client.close()
        assert server.receive(TIMEOUT_S) == b""
    finally:
        server.close()


def test_shutdown_read_wakes_a_blocked_reader(pki: Path) -> None:
    server, client = connected_pair(pki)
    got: list[bytes] = []
    try:
        reader = threading.Thread(target=lambda: got.append(server.receive()))
        reader.start()
        server.shutdown_read()
        reader.join(TIMEOUT_S)
        assert not reader.is_alive()
        assert got == [b""]
    finally:
        server.close()
        client.close()


def test_frame_parser_takes_a_stream_in_any_pieces() -> None:
    ops = [Op(OpKind.WRITE, 0, f"f{i}", offset=i, data=bytes([i]) * (i * 997)) for i in range(20)]
    stream = b"".join(encode_op(op, seq) for seq, op in enumerate(ops, 1)) + encode(Ack(7, True))
    parser = _FrameParser()
    frames = []
    for start in range(0, len(stream), 1234):
        got, error = parser.feed(stream[start:start + 1234])
        assert error is None
        frames += got
    assert [(f.path, f.data) for f in frames[:-1]] == [(op.path, op.data) for op in ops]
    assert frames[-1] == Ack(7, True)
    assert parser.buffered == 0


def test_frame_parser_returns_the_good_frames_before_a_malformed_one() -> None:
    good = encode_op(Op(OpKind.MKDIR, 0, "d", mode=0o755), 1)
    bad = (5).to_bytes(4, "big") + b"\xff" * 5  # an unknown frame type
    frames, error = _FrameParser().feed(good + bad + good)
    assert len(frames) == 1 and frames[0].path == "d"
    assert isinstance(error, ProtocolError)
