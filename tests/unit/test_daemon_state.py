"""What the daemon keeps on disk between runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.cluster import Generation, Memory
from appliance.daemon import MemoryStore, next_heartbeat_epoch, sync_mode
from appliance.errors import MirrorhaError


def test_heartbeat_epoch_grows_even_when_the_clock_went_back(tmp_path: Path) -> None:
    path = tmp_path / "heartbeat.epoch"
    future = time.time_ns() + 3600 * 10**9  # the previous run's clock was an hour ahead
    path.write_text(str(future))
    first = next_heartbeat_epoch(path)
    assert first == future + 1
    assert next_heartbeat_epoch(path) == first + 1


def test_memory_survives_a_restart(tmp_path: Path) -> None:
    store = MemoryStore(tmp_path / "state.json")
    assert store.load() == Memory()
    mem = Memory(gen=Generation(7, "node2"), synced=Generation(5, "node1"), last_role="prim")
    store.save(mem)
    assert MemoryStore(tmp_path / "state.json").load() == mem


def test_corrupt_state_is_refused_rather_than_guessed(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"gen": [1, "node1"]')
    with pytest.raises(MirrorhaError, match="refusing to guess"):
        MemoryStore(path).load()


G0, G1, G2 = Generation(), Generation(1, "node1"), Generation(2, "node1")


@pytest.mark.parametrize(("me", "peer", "identical", "expected"), [
    (Memory(G1, G1), Memory(G1, G1), True, ("attach", [1, "node1"])),
    # The peer lags behind the generation both last had in sync: the journals may say what.
    (Memory(G2, G1), Memory(G1, G1), False, ("reintegrate", [1, "node1"])),
    # Never in sync before (first start): checksums decide.
    (Memory(G1, G0), Memory(G0, G0), False, ("reintegrate", None)),
    # The peer wrote on its own (split brain resolved for us): its data is set aside.
    (Memory(G2, G1), Memory(Generation(2, "node2"), G1), False, ("full", None)),
])
def test_sync_mode_follows_the_generations(me: Memory, peer: Memory, identical: bool,
                                           expected: tuple[str, object]) -> None:
    assert sync_mode(me, peer, identical) == expected
