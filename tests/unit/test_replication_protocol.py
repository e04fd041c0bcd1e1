"""Replication framing: every frame survives a round trip; every malformed input is refused."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import replace

import pytest

from appliance.replication.protocol import (
    MAX_DATA,
    MAX_FRAME,
    MAX_PATH,
    NO_ID,
    Ack,
    Frame,
    FrameType,
    Hello,
    Nack,
    Op,
    OpKind,
    ProtocolError,
    Reply,
    SetattrField,
    decode,
    encode,
    encode_op,
    frame_length,
)

# The wire format as documented in protocol.py, written out independently of its private
# structs so that an accidental change of the format fails here.
OP_HEADER = struct.Struct(">QBHIQQIqqqqQHHI")
NON_UTF8 = os.fsdecode(b"r\xe9pertoire/\xff\xfe")


def round_trip(frame: Frame) -> Frame:
    wire = encode(frame)
    rest = frame_length(wire[:4])
    assert rest == len(wire) - 4
    return decode(wire[4:])


def payload(frame: Frame) -> bytes:
    """The bytes decode() takes: frame type + body."""
    return encode(frame)[4:]


def raw_op(
    *, kind: int = OpKind.WRITE, path: bytes = b"f", path2: bytes = b"", data: bytes = b"",
    n1: int | None = None, n2: int | None = None, nd: int | None = None,
) -> bytes:
    """An OP payload whose length fields may lie."""
    header = OP_HEADER.pack(
        7, kind, 0, 0, 0, 0, 0, NO_ID, NO_ID, NO_ID, NO_ID, 0,
        len(path) if n1 is None else n1, len(path2) if n2 is None else n2,
        len(data) if nd is None else nd)
    return bytes([FrameType.OP]) + header + path + path2 + data


# -- round trips --------------------------------------------------------------------------------


FULL_OP = dict(
    seq=2**64 - 1, path2="dest/" + NON_UTF8, offset=2**64 - 1, length=2**64 - 1, mode=2**32 - 1,
    uid=2**63 - 1, gid=NO_ID, flags=2**32 - 1, atime_ns=-(2**63), mtime_ns=2**63 - 1,
    rdev=2**64 - 1, data=b"\x00\xffpayload")


@pytest.mark.parametrize("kind", list(OpKind), ids=lambda k: k.name)
def test_every_op_kind_round_trips_with_extreme_fields(kind: OpKind) -> None:
    op = Op(kind, 65535, NON_UTF8, **FULL_OP)  # type: ignore[arg-type]
    assert round_trip(op) == op


@pytest.mark.parametrize("kind", list(OpKind), ids=lambda k: k.name)
def test_every_op_kind_round_trips_with_defaults(kind: OpKind) -> None:
    op = Op(kind, 0, "")
    assert round_trip(op) == op


@pytest.mark.parametrize(
    "op",
    [
        Op(OpKind.WRITE, 0, "f", data=b""),
        Op(OpKind.WRITE, 0, "f", offset=MAX_DATA, data=os.urandom(MAX_DATA)),
        Op(OpKind.CREATE, 1, "a" * MAX_PATH, mode=0o100644, uid=0, gid=0),
        Op(OpKind.SYMLINK, 0, "link", path2="../" * 1000 + os.fsdecode(b"\x80")),
        Op(OpKind.RENAME, 0, "caf\u00e9", path2="\u65e5\u672c", flags=2),
        Op(OpKind.SETATTR, 0, "f", flags=SetattrField.MODE | SetattrField.MTIME, mode=0o755,
           mtime_ns=1_700_000_000_123_456_789),
        Op(OpKind.MKNOD, 0, "null", mode=0o20666, rdev=os.makedev(1, 3)),
    ],
    ids=["empty-data", "4mib-data", "max-path", "non-utf8-target", "unicode-names",
         "setattr", "mknod"],
)
def test_op_edge_cases_round_trip(op: Op) -> None:
    assert round_trip(op) == op


def test_non_utf8_names_keep_their_exact_bytes() -> None:
    op = Op(OpKind.LINK, 0, NON_UTF8, path2=os.fsdecode(b"\xc3\x28"))
    decoded = round_trip(op)
    assert isinstance(decoded, Op)
    assert os.fsencode(decoded.path) == b"r\xe9pertoire/\xff\xfe"
    assert os.fsencode(decoded.path2) == b"\xc3\x28"


def test_op_encoding_follows_the_documented_layout() -> None:
    op = Op(OpKind.WRITE, 3, "ab", seq=9, path2="c", offset=4096, length=5, mode=0o644, uid=1,
            gid=2, flags=6, atime_ns=7, mtime_ns=8, rdev=10, data=b"xyz")
    body = OP_HEADER.pack(9, 1, 3, 6, 4096, 5, 0o644, 1, 2, 7, 8, 10, 2, 1, 3) + b"abcxyz"
    assert encode(op) == struct.pack(">IB", len(body) + 1, FrameType.OP) + body
    assert op.size == len(body)


@pytest.mark.parametrize(
    "frame",
    [
        Ack(0, durable=False),
        Ack(2**64 - 1, durable=True),
        Nack(5, 28, "No space left on device"),
        Nack(2**64 - 1, 65535, ""),
        Nack(1, 1, "\u00e9chec \u2014 refus\u00e9"),
        Hello({}),
        Hello({"node": "node1", "module": "mirror", "generation": [42, "node1"],
               "nested": {"ok": True, "none": None, "f": 1.5}}),
        Reply(7, True, b""),
        Reply(2**64 - 1, False, bytes(range(256)) * 4096),
    ],
    ids=["ack", "ack-durable-max", "nack", "nack-max-empty", "nack-unicode", "hello-empty",
         "hello", "reply-empty-last", "reply-max"],
)
def test_control_frames_round_trip(frame: Frame) -> None:
    assert round_trip(frame) == frame


def test_long_nack_message_is_cut_not_refused() -> None:
    decoded = round_trip(Nack(1, 5, "a" + "\u00e9" * 1000))
    assert isinstance(decoded, Nack)
    assert decoded.message.startswith("a\u00e9\u00e9")
    assert len(decoded.message.encode()) <= 1024 + 3  # cut at 1024 bytes, maybe mid-character


def test_only_fsync_and_sync_are_durable() -> None:
    durable = {k for k in OpKind if Op(k, 0, "").durable}
    assert durable == {OpKind.FSYNC, OpKind.SYNC}


# -- what the encoder refuses -------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        Op(OpKind.CREATE, 0, "a" * (MAX_PATH + 1)),
        Op(OpKind.RENAME, 0, "a", path2="b" * (MAX_PATH + 1)),
        Op(OpKind.WRITE, 0, "f", data=bytes(MAX_DATA + 1)),
        Hello({"pad": "x" * 70_000}),
    ],
    ids=["path", "path2", "data", "hello"],
)
def test_encoder_refuses_oversized_fields(frame: Frame) -> None:
    with pytest.raises(ProtocolError):
        encode(frame)


# -- frame length -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 100, MAX_FRAME])
def test_frame_length_accepts_the_valid_range(length: int) -> None:
    assert frame_length(struct.pack(">I", length)) == length


@pytest.mark.parametrize(
    "header",
    [struct.pack(">I", 0), struct.pack(">I", MAX_FRAME + 1), b"\xff\xff\xff\xff", b"\x00\x00\x01",
     b"", b"\x00\x00\x00\x01\x00"],
    ids=["zero", "over-max", "max-u32", "short", "empty", "long"],
)
def test_frame_length_refuses_out_of_range_or_short_headers(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        frame_length(header)


def test_the_largest_op_fits_in_max_frame() -> None:
    op = Op(OpKind.WRITE, 0, "p" * MAX_PATH, path2="q" * MAX_PATH, data=bytes(MAX_DATA))
    wire = encode(op)
    assert frame_length(wire[:4]) == len(wire) - 4 <= MAX_FRAME


# -- malformed payloads -------------------------------------------------------------------------


VALID_OP = raw_op(path=b"dir/f", path2=b"g", data=b"data")
MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("frame-type-0", b"\x00" + payload(Ack(1, True))[1:]),
    ("frame-type-6", b"\x06" + payload(Ack(1, True))[1:]),
    ("frame-type-255", b"\xff"),
    ("op-kind-0", raw_op(kind=0)),
    ("op-kind-20", raw_op(kind=20)),
    ("op-kind-255", raw_op(kind=255)),
    ("op-path-len-beyond-frame", raw_op(path=b"f", n1=200)),
    ("op-path2-len-beyond-frame", raw_op(path2=b"g", n2=2)),
    ("op-data-len-beyond-frame", raw_op(data=b"abc", nd=4)),
    ("op-lengths-short", raw_op(path=b"abc", n1=1)),
    ("op-trailing-byte", VALID_OP + b"\x00"),
    ("op-path-over-max", raw_op(path=b"a" * (MAX_PATH + 1))),
    ("op-path2-over-max", raw_op(path2=b"a" * (MAX_PATH + 1))),
    ("op-data-over-max", raw_op(data=bytes(MAX_DATA + 1))),
    ("op-length-wraps", raw_op(path=b"f", n1=65535, n2=65535, nd=2**32 - 1)),
    ("reply-short", bytes([FrameType.REPLY]) + b"\x00" * 8),
    ("reply-last-2", bytes([FrameType.REPLY]) + struct.pack(">QB", 1, 2) + b"x"),
    ("ack-trailing-byte", payload(Ack(1, True)) + b"\x00"),
    ("nack-message-short", payload(Nack(1, 2, "hello"))[:-1]),
    ("nack-message-long", payload(Nack(1, 2, "hello")) + b"!"),
    ("hello-trailing-byte", payload(Hello({"a": 1})) + b" "),
    ("hello-list", bytes([FrameType.HELLO]) + struct.pack(">H", 6) + b"[1, 2]"),
    ("hello-string", bytes([FrameType.HELLO]) + struct.pack(">H", 5) + b'"abc"'),
    ("hello-null", bytes([FrameType.HELLO]) + struct.pack(">H", 4) + b"null"),
    ("hello-invalid-json", bytes([FrameType.HELLO]) + struct.pack(">H", 8) + b'{"a": 1,'),
    ("hello-not-utf8", bytes([FrameType.HELLO]) + struct.pack(">H", 3) + b'"\xff"'),
    ("hello-empty-json", bytes([FrameType.HELLO]) + struct.pack(">H", 0)),
]


@pytest.mark.parametrize("data", [d for _, d in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_payloads_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_the_valid_op_used_for_corruption_decodes() -> None:
    decoded = decode(VALID_OP)
    assert isinstance(decoded, Op)
    assert (decoded.path, decoded.path2, decoded.data) == ("dir/f", "g", b"data")


TRUNCATABLE: list[tuple[str, bytes]] = [
    ("op", VALID_OP),
    ("op-with-names", payload(Op(OpKind.RENAME, 0, NON_UTF8, path2="x"))),
    ("ack", payload(Ack(3, False))),
    ("nack", payload(Nack(3, 5, "refused"))),
    ("hello", payload(Hello({"node": "node1", "generation": [1, "n"]}))),
]


@pytest.mark.parametrize("data", [d for _, d in TRUNCATABLE], ids=[n for n, _ in TRUNCATABLE])
def test_every_truncation_of_a_frame_is_a_protocol_error(data: bytes) -> None:
    decode(data)  # the whole frame is fine
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            decode(data[:cut])


def test_deeply_nested_hello_is_a_protocol_error() -> None:
    text = b"[" * 60_000
    with pytest.raises(ProtocolError):
        decode(bytes([FrameType.HELLO]) + struct.pack(">H", len(text)) + text)


def test_hello_json_is_parsed_strictly_as_an_object() -> None:
    text = json.dumps({"node": "n\u00e9"}).encode()
    decoded = decode(bytes([FrameType.HELLO]) + struct.pack(">H", len(text)) + text)
    assert decoded == Hello({"node": "n\u00e9"})


@pytest.mark.parametrize("kind", list(OpKind))
def test_encode_op_numbers_the_frame_like_a_numbered_copy_would(kind: OpKind) -> None:
    op = Op(kind, 3, "dir/f", path2="g", offset=7, length=9, data=b"abc")
    assert encode_op(op, 12345) == encode(replace(op, seq=12345))
