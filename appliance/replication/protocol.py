"""Replication protocol: the operations the primary streams to the secondary, and their framing.

Every mutation the application makes through the FUSE over-mount becomes one `Op`, identified
by the replicated directory it belongs to (`root`, index in userconfig order) and a path
relative to that directory. Paths, never inode numbers: the two nodes' inodes differ. The
secondary applies ops strictly in sequence order, so its copy is always an in-order prefix of
the primary's operation stream (crash-consistent at every instant).

Wire format (one TCP stream per module, inside TLS): a frame is
    u32 length of the rest | u8 frame type | body
OP body:    u64 seq | u8 kind | u16 root | u32 flags | u64 offset | u64 length | u32 mode
            | i64 uid | i64 gid | i64 atime_ns | i64 mtime_ns | u64 rdev
            | u16 len(path) | u16 len(path2) | u32 len(data) | path | path2 | data
ACK body:   u64 seq (everything up to and including seq is acknowledged) | u8 durable
NACK body:  u64 seq | u16 errno | u16 len(message) | message   (the secondary refused an op)
HELLO body: u16 len(json) | json (node, module, generation... at connection start)
REPLY body: u64 seq | u8 last | payload   (the secondary's answer to a query op: LIST, SUMS;
            a long answer is split over several REPLY frames, the last one has last=1)
Everything is big-endian. A decoder never trusts a length before checking it against the
frame size, and rejects unknown kinds, over-long paths and frames over MAX_FRAME.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from appliance.errors import MirrorhaError

MAX_DATA = 4 * 1024 * 1024  # largest write payload in one op (FUSE max_write is 1 MiB)
MAX_PATH = 4096
MAX_FRAME = MAX_DATA + 2 * MAX_PATH + 256
NO_ID = -1  # uid/gid/time not set (setattr of some fields only)


class OpKind(IntEnum):
    WRITE = 1  # data at offset
    TRUNCATE = 2  # length = new size
    CREATE = 3  # regular file: mode, uid, gid; flags O_EXCL-like semantics not needed
    MKNOD = 4  # mode (with file type bits), rdev
    MKDIR = 5
    UNLINK = 6
    RMDIR = 7
    RENAME = 8  # path -> path2; flags = renameat2 flags (RENAME_NOREPLACE / RENAME_EXCHANGE)
    LINK = 9  # hard link: existing path -> new name path2
    SYMLINK = 10  # path = the link to create, path2 = its target (stored verbatim, never followed)
    SETATTR = 11  # mode / uid / gid / atime_ns / mtime_ns, each only if set (flags: SetattrField)
    FSYNC = 12  # flags: 1 = datasync; the secondary fsyncs that file before acking durable
    FALLOCATE = 13  # flags = fallocate mode (incl. punch hole), offset, length
    SYNC = 14  # barrier: ack durable once everything before is on the secondary's disk
    RESET = 15  # full resync starts: the secondary moves the dir's content aside (kept, not
    #             deleted: it may be the losing side of a split brain) and starts from empty
    RESYNC_DONE = 16  # every op of the full resync precedes this one: the secondary is in sync
    REINT_BEGIN = 17  # reintegration starts: the secondary keeps its copy (only what differs
    #                   is sent) but no longer trusts it until RESYNC_DONE
    LIST = 18  # query: the secondary answers (REPLY) with its tree and its journal's summary
    SUMS = 19  # query: block checksums of file `path` (block size in `length`)


class SetattrField(IntEnum):
    MODE = 1
    UID = 2
    GID = 4
    ATIME = 8
    MTIME = 16


class FrameType(IntEnum):
    OP = 1
    ACK = 2
    NACK = 3
    HELLO = 4
    REPLY = 5


class ProtocolError(MirrorhaError):
    """A frame that is malformed or violates the protocol: the connection is dropped."""


@dataclass(frozen=True)
class Op:
    kind: OpKind
    root: int
    path: str
    seq: int = 0
    path2: str = ""
    offset: int = 0
    length: int = 0
    mode: int = 0
    uid: int = NO_ID
    gid: int = NO_ID
    flags: int = 0
    atime_ns: int = NO_ID
    mtime_ns: int = NO_ID
    rdev: int = 0
    data: bytes = b""

    @property
    def durable(self) -> bool:
        """The application asked for durability: the primary waits for the secondary's ack."""
        return self.kind in (OpKind.FSYNC, OpKind.SYNC)

    @property
    def query(self) -> bool:
        """The secondary answers this op with REPLY frames (it changes nothing there)."""
        return self.kind in (OpKind.LIST, OpKind.SUMS)

    @property
    def size(self) -> int:
        """Bytes this op puts on the wire (for lag and RPO accounting)."""
        return len(self.data) + len(self.path) + len(self.path2) + _OP_FIXED.size


@dataclass(frozen=True)
class Ack:
    seq: int
    durable: bool


@dataclass(frozen=True)
class Nack:
    seq: int
    errno: int
    message: str


@dataclass(frozen=True)
class Hello:
    info: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    seq: int
    last: bool
    payload: bytes


Frame = Op | Ack | Nack | Hello | Reply

_LEN = struct.Struct(">IB")
_OP_FIXED = struct.Struct(">QBHIQQIqqqqQHHI")
_ACK = struct.Struct(">QB")
_NACK = struct.Struct(">QHH")
_HELLO = struct.Struct(">H")
_REPLY = struct.Struct(">QB")
MAX_REPLY = 1024 * 1024  # payload bytes per REPLY frame
ZERO_COPY_BYTES = 32 * 1024  # a write's data from this size on is sent from its own buffer


def encode(frame: Frame) -> bytes:
    match frame:
        case Op():
            body = _encode_op(frame)
            ftype = FrameType.OP
        case Ack():
            body = _ACK.pack(frame.seq, 1 if frame.durable else 0)
            ftype = FrameType.ACK
        case Nack():
            msg = frame.message.encode()[:1024]
            body = _NACK.pack(frame.seq, frame.errno, len(msg)) + msg
            ftype = FrameType.NACK
        case Hello():
            text = json.dumps(frame.info).encode()
            if len(text) > 65535:
                raise ProtocolError("hello too large")
            body = _HELLO.pack(len(text)) + text
            ftype = FrameType.HELLO
        case Reply():
            if len(frame.payload) > MAX_REPLY:
                raise ProtocolError(f"reply of {len(frame.payload)} bytes exceeds {MAX_REPLY}")
            body = _REPLY.pack(frame.seq, 1 if frame.last else 0) + frame.payload
            ftype = FrameType.REPLY
    return _LEN.pack(len(body) + 1, ftype) + body


def encode_op(op: Op, seq: int) -> bytes:
    """encode(replace(op, seq=seq)) without building the numbered copy of the op."""
    head = _op_head(op, seq)
    return b"".join((_LEN.pack(len(head) + len(op.data) + 1, FrameType.OP), head, op.data))


def encode_op_parts(op: Op, seq: int) -> tuple[bytes, ...]:
    """encode_op(op, seq) as buffers to send one after the other: for a large write, the frame
    up to its data, then the data object itself, not copied (at 128 KiB a FUSE write, each
    copy of it was a few percent of the primary's time)."""
    if len(op.data) < ZERO_COPY_BYTES:
        return (encode_op(op, seq),)
    head = _op_head(op, seq)
    return _LEN.pack(len(head) + len(op.data) + 1, FrameType.OP) + head, op.data


def _encode_op(op: Op, seq: int | None = None) -> bytes:
    return _op_head(op, seq) + op.data


def _op_head(op: Op, seq: int | None) -> bytes:
    """An op's body up to its data (which follows it on the wire)."""
    path, path2 = os.fsencode(op.path), os.fsencode(op.path2)  # any Linux name, UTF-8 or not
    if len(path) > MAX_PATH or len(path2) > MAX_PATH:
        raise ProtocolError(f"path too long ({len(path)}/{len(path2)} bytes)")
    if len(op.data) > MAX_DATA:
        raise ProtocolError(f"write of {len(op.data)} bytes exceeds {MAX_DATA}")
    fixed = _OP_FIXED.pack(
        op.seq if seq is None else seq, op.kind, op.root, op.flags, op.offset, op.length,
        op.mode, op.uid, op.gid, op.atime_ns, op.mtime_ns, op.rdev, len(path), len(path2),
        len(op.data))
    return b"".join((fixed, path, path2))


def frame_length(header: bytes | memoryview) -> int:
    """Given the first 4 bytes of a frame, how many more bytes to read (checked)."""
    if len(header) != 4:
        raise ProtocolError("short frame header")
    (length,) = struct.unpack(">I", header)
    if length < 1 or length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} out of range")
    return length


def decode(payload: bytes | memoryview) -> Frame:
    """Decode the bytes after the 4-byte length (frame type + body)."""
    if not payload:
        raise ProtocolError("empty frame")
    try:
        ftype = FrameType(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown frame type {payload[0]}") from None
    body = memoryview(payload)[1:]
    try:
        match ftype:
            case FrameType.OP:
                return _decode_op(body)
            case FrameType.ACK:
                _expect(body, _ACK.size, "ack")
                seq, durable = _ACK.unpack(body)
                return Ack(seq, bool(durable))
            case FrameType.NACK:
                seq, err, n = _NACK.unpack_from(body)
                _expect(body, _NACK.size + n, "nack")
                return Nack(seq, err, bytes(body[_NACK.size:]).decode(errors="replace"))
            case FrameType.HELLO:
                (n,) = _HELLO.unpack_from(body)
                _expect(body, _HELLO.size + n, "hello")
                info = json.loads(bytes(body[_HELLO.size:]))
                if not isinstance(info, dict):
                    raise ProtocolError("hello is not an object")
                return Hello(info)
            case FrameType.REPLY:
                seq, last = _REPLY.unpack_from(body)
                if len(body) - _REPLY.size > MAX_REPLY or last > 1:
                    raise ProtocolError("malformed reply frame")
                return Reply(seq, bool(last), bytes(body[_REPLY.size:]))
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"malformed {ftype.name} frame: {e}") from None
    raise ProtocolError(f"unhandled frame type {ftype}")


def _expect(body: memoryview, size: int, what: str) -> None:
    if len(body) != size:
        raise ProtocolError(f"{what} frame of {len(body)} bytes, expected {size}")


def _decode_op(body: memoryview) -> Op:
    (seq, kind, root, flags, offset, length, mode, uid, gid, atime, mtime, rdev,
     n1, n2, nd) = _OP_FIXED.unpack_from(body)
    _expect(body, _OP_FIXED.size + n1 + n2 + nd, "op")
    if n1 > MAX_PATH or n2 > MAX_PATH or nd > MAX_DATA:
        raise ProtocolError("op field too long")
    try:
        op_kind = OpKind(kind)
    except ValueError:
        raise ProtocolError(f"unknown op kind {kind}") from None
    start = _OP_FIXED.size
    path = os.fsdecode(bytes(body[start:start + n1]))
    path2 = os.fsdecode(bytes(body[start + n1:start + n1 + n2]))
    data = bytes(body[start + n1 + n2:])
    return Op(op_kind, root, path, seq, path2, offset, length, mode, uid, gid, flags, atime,
              mtime, rdev, data)
