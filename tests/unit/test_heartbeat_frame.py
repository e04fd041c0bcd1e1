"""Heartbeat frame, anti-replay window and loss decision: pure logic, no sockets."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from appliance.heartbeat import (
    MAC_LEN,
    MAX_FRAME,
    BadMac,
    FrameTooLarge,
    Malformed,
    NetworkLost,
    NetworkRestored,
    PeerHeard,
    PeerSilent,
    PeerTracker,
    ReplayGuard,
    _mac,
    decode_frame,
    encode_frame,
    icmp_echo_request,
    internet_checksum,
    parse_echo_reply,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PAYLOAD = {"state": "PRIM", "generation": [42, "node1"], "text": "café"}


def frame(payload: dict | None = None, seq: int = 7) -> bytes:
    return encode_frame(KEY, "node1", 1_700_000_000_000_000_000, seq, payload or PAYLOAD)


def resign(body: bytes, key: bytes = KEY) -> bytes:
    """A frame whose MAC is valid for `body`: what a holder of the key could send."""
    return body + _mac(key, body)


# -- frame ------------------------------------------------------------------------------------


def test_frame_round_trip_keeps_every_field() -> None:
    decoded = decode_frame(KEY, frame(seq=2**64 - 1))
    assert decoded.sender == "node1"
    assert decoded.epoch == 1_700_000_000_000_000_000
    assert decoded.seq == 2**64 - 1
    assert decoded.payload == PAYLOAD


def test_frame_starts_with_magic_and_version() -> None:
    assert frame()[:5] == b"MHHB\x01"


def test_tampering_any_byte_after_the_header_constants_is_a_bad_mac() -> None:
    data = frame()
    for i in range(5, len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(BadMac):
            decode_frame(KEY, bytes(tampered))


def test_tampering_magic_or_version_is_malformed() -> None:
    # Checked against constants before the MAC, so other protocols do not look like a key
    # mismatch; the frame is refused either way.
    data = frame()
    for i in range(5):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(Malformed):
            decode_frame(KEY, bytes(tampered))


def test_wrong_key_is_a_bad_mac() -> None:
    with pytest.raises(BadMac):
        decode_frame(OTHER_KEY, frame())


@pytest.mark.parametrize("cut", [1, MAC_LEN, 40, 60])
def test_truncated_frame_is_refused(cut: int) -> None:
    with pytest.raises((Malformed, BadMac)):
        decode_frame(KEY, frame()[:-cut])


def test_frame_shorter_than_the_minimum_is_malformed() -> None:
    with pytest.raises(Malformed, match="shorter"):
        decode_frame(KEY, frame()[:40])
    with pytest.raises(Malformed):
        decode_frame(KEY, b"")


def test_oversized_frame_is_malformed_even_with_a_valid_mac() -> None:
    data = frame()
    body = data[:-MAC_LEN]
    padded = resign(body[:-1] + b',"pad":"' + b"x" * MAX_FRAME + b'"}')
    with pytest.raises(Malformed, match="exceeds"):
        decode_frame(KEY, padded)


def test_encoding_a_payload_too_big_for_one_frame_is_refused() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(KEY, "node1", 1, 1, {"blob": "x" * MAX_FRAME})


def test_largest_frame_that_fits_round_trips() -> None:
    base = len(encode_frame(KEY, "node1", 1, 1, {"blob": ""}))
    data = encode_frame(KEY, "node1", 1, 1, {"blob": "x" * (MAX_FRAME - base)})
    assert len(data) == MAX_FRAME
    assert decode_frame(KEY, data).payload["blob"] == "x" * (MAX_FRAME - base)


def test_bad_magic_with_valid_mac_is_malformed() -> None:
    with pytest.raises(Malformed, match="magic"):
        decode_frame(KEY, resign(b"XXHB" + frame()[4:-MAC_LEN]))


def test_unknown_version_is_malformed() -> None:
    with pytest.raises(Malformed, match="version 2"):
        decode_frame(KEY, resign(b"MHHB\x02" + frame()[5:-MAC_LEN]))


def test_authenticated_but_non_object_payload_is_malformed() -> None:
    body = frame()[:-MAC_LEN]
    header = body[: body.index(b"{")]
    for payload in (b"[1,2]", b"not json", b"\xff\xfe"):
        with pytest.raises(Malformed):
            decode_frame(KEY, resign(header + payload))


def test_sender_length_beyond_the_frame_is_malformed() -> None:
    body = bytearray(frame()[:-MAC_LEN])
    body[5] = 255
    with pytest.raises(Malformed, match="length"):
        decode_frame(KEY, resign(bytes(body)))


def test_layout_is_header_then_compact_json_then_mac() -> None:
    data = frame({"a": 1})
    assert data[-MAC_LEN - len(b'{"a":1}') : -MAC_LEN] == b'{"a":1}'
    assert data[5] == len("node1") and data[6:11] == b"node1"
    epoch, seq = struct.unpack_from("!QQ", data, 11)
    assert (epoch, seq) == (1_700_000_000_000_000_000, 7)


# -- replay guard -----------------------------------------------------------------------------


def test_duplicate_seq_is_a_replay() -> None:
    guard = ReplayGuard()
    assert guard.accept("node1", 10, 5)
    assert not guard.accept("node1", 10, 5)


def test_out_of_order_seqs_within_the_window_are_accepted_once() -> None:
    guard = ReplayGuard(window=128)
    assert guard.accept("node1", 10, 100)
    assert guard.accept("node1", 10, 98)
    assert guard.accept("node1", 10, 99)
    assert not guard.accept("node1", 10, 98)
    assert guard.accept("node1", 10, 101)
    assert not guard.accept("node1", 10, 100)


def test_window_edge() -> None:
    guard = ReplayGuard(window=128)
    assert guard.accept("node1", 10, 1000)
    assert guard.accept("node1", 10, 1000 - 127)  # the oldest seq the window still tracks
    assert not guard.accept("node1", 10, 1000 - 127)
    assert not guard.accept("node1", 10, 1000 - 128)  # too old to tell: refused


def test_a_jump_beyond_the_window_forgets_older_seqs() -> None:
    guard = ReplayGuard(window=128)
    assert guard.accept("node1", 10, 1)
    assert guard.accept("node1", 10, 1 + 500)
    assert not guard.accept("node1", 10, 1)
    assert guard.accept("node1", 10, 500)


def test_older_epoch_is_a_replay() -> None:
    guard = ReplayGuard()
    assert guard.accept("node1", 20, 1)
    assert not guard.accept("node1", 19, 999)


def test_new_epoch_resets_the_window() -> None:
    guard = ReplayGuard()
    assert guard.accept("node1", 20, 500)
    assert guard.accept("node1", 21, 1)  # the sender restarted: its seq starts over
    assert not guard.accept("node1", 21, 1)
    assert not guard.accept("node1", 20, 501)  # the previous run is over


def test_senders_have_separate_windows() -> None:
    guard = ReplayGuard()
    assert guard.accept("node1", 20, 5)
    assert guard.accept("node2", 20, 5)


# -- peer tracker -----------------------------------------------------------------------------

NETS = ("lan", "rep")
T = 0.3  # timeout in seconds


def tracker() -> PeerTracker:
    return PeerTracker(peer="node1", networks=NETS, timeout_s=T, start=100.0)


def heard_on_both(tr: PeerTracker, now: float, payload: dict | None = None) -> None:
    for net in NETS:
        tr.receipt(net, now, payload or {"s": 1})


def test_first_receipt_is_peer_heard_then_only_payload_changes() -> None:
    tr = tracker()
    assert tr.receipt("lan", 100.05, {"s": 1}) == [PeerHeard(payload={"s": 1}, network="lan")]
    assert tr.receipt("rep", 100.06, {"s": 1}) == []
    assert tr.receipt("lan", 100.10, {"s": 1}) == []
    assert tr.receipt("rep", 100.11, {"s": 2}) == [PeerHeard(payload={"s": 2}, network="rep")]
    assert tr.peer_up


def test_one_network_silent_is_network_lost_not_peer_silent() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    tr.receipt("lan", 100.25, {"s": 1})
    assert tr.check(100.29) == []
    assert tr.check(100.40) == [NetworkLost(network="rep", silent_ms=400, still_up=1, total=2)]
    assert tr.check(100.45) == []  # reported once
    assert tr.peer_up


def test_all_networks_silent_is_peer_silent_once_with_detail() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    tr.receipt("lan", 100.1, {"s": 1})
    assert tr.check(100.35) == [NetworkLost(network="rep", silent_ms=350, still_up=1, total=2)]
    events = tr.check(100.412)
    assert events == [
        PeerSilent(
            silent_ms=312,
            networks_total=2,
            detail="no heartbeat from node1 on 2/2 networks for 312 ms",
        )
    ]
    assert not tr.peer_up
    assert tr.check(100.5) == []
    assert tr.check(105.0) == []


def test_networks_silent_together_give_only_peer_silent() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    events = tr.check(100.31)
    assert [type(e) for e in events] == [PeerSilent]
    assert events[0].silent_ms == 310


def test_nothing_heard_since_start_reports_peer_silent_once() -> None:
    tr = tracker()
    assert tr.check(100.29) == []
    events = tr.check(100.305)
    assert len(events) == 1 and isinstance(events[0], PeerSilent)
    assert events[0].detail.startswith("no heartbeat from node1 since start")
    assert "2/2 networks" in events[0].detail
    assert events[0].silent_ms == 305
    assert tr.check(101.0) == []


def test_restored_network_is_reported() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    tr.receipt("lan", 100.2, {"s": 1})
    assert [type(e) for e in tr.check(100.35)] == [NetworkLost]
    assert tr.receipt("rep", 100.4, {"s": 1}) == [NetworkRestored(network="rep")]
    assert tr.receipt("rep", 100.45, {"s": 1}) == []


def test_restored_network_with_new_payload_reports_both() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    tr.receipt("lan", 100.2, {"s": 1})
    tr.check(100.35)
    assert tr.receipt("rep", 100.4, {"s": 2}) == [
        NetworkRestored(network="rep"),
        PeerHeard(payload={"s": 2}, network="rep"),
    ]


def test_peer_back_after_loss_is_peer_heard_even_with_the_same_payload() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    assert [type(e) for e in tr.check(100.4)] == [PeerSilent]
    assert tr.receipt("rep", 101.0, {"s": 1}) == [PeerHeard(payload={"s": 1}, network="rep")]
    assert tr.peer_up
    # The other network was part of the loss, not reported lost: no NetworkRestored for it.
    assert tr.receipt("lan", 101.01, {"s": 1}) == []


def test_after_peer_returns_a_network_that_stays_silent_is_lost_after_a_full_timeout() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    tr.check(100.4)
    tr.receipt("rep", 101.0, {"s": 1})
    tr.receipt("rep", 101.2, {"s": 1})
    assert tr.check(101.25) == []  # lan gets a full timeout from the peer's return
    assert tr.check(101.31) == [NetworkLost(network="lan", silent_ms=310, still_up=1, total=2)]


def test_a_second_loss_is_reported_again() -> None:
    tr = tracker()
    heard_on_both(tr, 100.0)
    assert [type(e) for e in tr.check(100.4)] == [PeerSilent]
    heard_on_both(tr, 101.0)
    assert [type(e) for e in tr.check(101.4)] == [PeerSilent]


def test_single_network_loss_is_peer_silent() -> None:
    tr = PeerTracker(peer="node2", networks=["only"], timeout_s=T, start=0.0)
    tr.receipt("only", 0.1, {})
    assert tr.check(0.5) == [
        PeerSilent(
            silent_ms=400,
            networks_total=1,
            detail="no heartbeat from node2 on 1/1 networks for 400 ms",
        )
    ]


# -- ICMP helpers used by the witness ---------------------------------------------------------


def test_echo_request_checksum_verifies() -> None:
    packet = icmp_echo_request(0x1234, 7, b"token")
    assert packet[0] == 8
    assert internet_checksum(packet) == 0


def test_echo_reply_is_parsed_from_an_ip_packet() -> None:
    request = icmp_echo_request(0x1234, 7, b"token!")
    reply = bytearray(request)
    reply[0] = 0  # echo reply: only the type changes, and the checksum with it
    reply[2:4] = b"\0\0"
    reply[2:4] = struct.pack("!H", internet_checksum(bytes(reply)))
    ip = bytes([0x45]) + bytes(11) + bytes([203, 0, 113, 9]) + bytes([203, 0, 113, 1])
    parsed = parse_echo_reply(ip + bytes(reply))
    assert parsed is not None
    assert (parsed.source, parsed.ident, parsed.seq, parsed.payload) == (
        IPv4Address("203.0.113.9"),
        0x1234,
        7,
        b"token!",
    )
    corrupted = bytearray(ip + bytes(reply))
    corrupted[-1] ^= 0xFF
    assert parse_echo_reply(bytes(corrupted)) is None
    assert parse_echo_reply(ip + request) is None  # a request, not a reply
