"""Scenarios for the pure state machine in appliance/cluster.py.

Each test threads a node's view through events with `run` and reads the decisions. Unless a test
says otherwise the node is node1 and its peer node2. The last part is a bounded random walk over
two nodes that checks invariants which must hold whatever the order of events.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from appliance.cluster import (
    RESTART_APP,
    SERVING,
    STEP_DOWN,
    TAKE_OVER,
    Action,
    Command,
    CommandEvent,
    Decision,
    Event,
    Generation,
    InterfaceChanged,
    Memory,
    NodeView,
    PeerHeard,
    PeerLost,
    PeerView,
    Policy,
    ProcessCheck,
    ResyncDone,
    ResyncFailed,
    State,
    Verdict,
    compare_data,
    step,
)

NODE, PEER = "node1", "node2"
GenSpec = tuple[int, str]

LOST = PeerLost("no heartbeat from node2 on 2/2 networks for 612 ms")
LOST_ISOLATED = PeerLost("no heartbeat from node2 on 2/2 networks for 612 ms", witness_ok=False)
LOST_WITNESS_OK = PeerLost("no heartbeat from node2 on 2/2 networks for 612 ms", witness_ok=True)
WITNESS = {"witness": True}


# ---------------------------------------------------------------------------------------------
# Builders


def policy(node: str = NODE, peer_name: str = PEER, **changes: Any) -> Policy:
    return Policy(node=node, peer=peer_name, **changes)


def memory(gen: GenSpec = (0, ""), synced: GenSpec | None = None, last_role: str = "",
           yielding: bool = False) -> Memory:
    """A node's memory; `synced` defaults to `gen` (nothing written alone since the last sync)."""
    return Memory(gen=Generation(*gen), synced=Generation(*(synced or gen)),
                  last_role=last_role, yielding=yielding)


def peer(state: State, gen: GenSpec = (0, ""), synced: GenSpec | None = None, *,
         in_sync: bool = False, handover: bool = False, last_role: str = "",
         yielding: bool = False) -> PeerView:
    return PeerView(state, memory(gen, synced, last_role, yielding), in_sync, handover)


def view(state: State = State.STOP, gen: GenSpec = (0, ""), synced: GenSpec | None = None, *,
         peer_view: PeerView | None = None, last_role: str = "", yielding: bool = False,
         pol: Policy | None = None, **changes: Any) -> NodeView:
    return NodeView(policy=pol or policy(), state=state,
                    memory=memory(gen, synced, last_role, yielding), peer=peer_view, **changes)


def heard(peer_view: PeerView) -> PeerHeard:
    return PeerHeard(peer_view)


def cmd(command: Command) -> CommandEvent:
    return CommandEvent(command)


def run(start: NodeView, *events: Event) -> list[Decision]:
    """Feed the events one after the other, each to the view the previous decision produced."""
    decisions = []
    current = start
    for event in events:
        decision = step(current, event)
        decisions.append(decision)
        current = decision.view
    return decisions


def last(start: NodeView, *events: Event) -> Decision:
    return run(start, *events)[-1]


def gen(counter: int, writer: str) -> Generation:
    return Generation(counter, writer)


# ---------------------------------------------------------------------------------------------
# Start / cold start


def test_start_without_news_of_the_peer_waits_for_it() -> None:
    (d,) = run(view(State.STOP), cmd(Command.START))

    assert d.view.state is State.WAIT
    assert d.actions == ()
    assert d.reason is not None and "waiting" in d.reason


def test_fresh_node_starts_alone_when_the_peer_stays_absent() -> None:
    d = last(view(State.WAIT), LOST)

    assert d.view.state is State.ALONE
    assert d.actions == (Action.ADD_VIP, Action.START_APP)
    assert d.view.memory.gen == gen(1, NODE)
    assert d.view.memory.last_role == "prim"
    assert d.reason is not None and "absent" in d.reason


@pytest.mark.parametrize(("defaultprim", "expected"), [
    ("alone", State.ALONE),
    (NODE, State.ALONE),
    (PEER, State.WAIT),
])
def test_fresh_node_alone_respects_defaultprim(defaultprim: str, expected: State) -> None:
    d = last(view(State.WAIT, pol=policy(defaultprim=defaultprim)), LOST)

    assert d.view.state is expected
    if expected is State.WAIT:
        assert d.actions == ()
        assert d.reason is not None and "defaultprim" in d.reason


def test_stale_node_waits_instead_of_starting_app() -> None:
    d = last(view(State.WAIT, (5, NODE), (5, NODE), last_role="prim"), LOST)

    assert d.view.state is State.WAIT
    assert Action.START_APP not in d.actions
    assert d.reason is not None and "stale" in d.reason


def test_node_that_wrote_alone_restarts_alone_without_its_peer() -> None:
    d = last(view(State.WAIT, (6, NODE), (5, NODE)), LOST)

    assert d.view.state is State.ALONE
    assert d.actions == TAKE_OVER
    assert d.view.memory.gen == gen(7, NODE)


def test_isolated_node_does_not_start_alone_when_the_witness_is_unreachable() -> None:
    start = view(State.WAIT, (6, NODE), (5, NODE), pol=policy(**WITNESS))

    isolated = last(start, LOST_ISOLATED)
    assert isolated.view.state is State.WAIT
    assert isolated.actions == ()
    assert isolated.reason is not None and "isolated" in isolated.reason

    assert last(start, LOST_WITNESS_OK).view.state is State.ALONE


def test_yielding_node_waits_for_its_peer() -> None:
    d = last(view(State.WAIT, (6, NODE), (5, NODE), yielding=True), LOST)

    assert d.view.state is State.WAIT
    assert d.actions == ()
    assert d.reason is not None and "second" in d.reason


@pytest.mark.parametrize(("gen_", "synced", "expected", "why"), [
    ((0, ""), (0, ""), State.ALONE, "absent"),
    ((6, NODE), (5, NODE), State.ALONE, "absent"),
    ((5, NODE), (5, NODE), State.WAIT, "stale"),
])
def test_start_after_the_peer_was_declared_absent_decides_at_once(
        gen_: GenSpec, synced: GenSpec, expected: State, why: str) -> None:
    lost_while_stopped, started = run(view(State.STOP, gen_, synced), LOST, cmd(Command.START))

    assert lost_while_stopped.view.state is State.STOP
    assert lost_while_stopped.actions == () and lost_while_stopped.reason is None
    assert started.view.state is expected
    assert started.actions == (TAKE_OVER if expected is State.ALONE else ())
    assert started.reason is not None and why in started.reason


# ---------------------------------------------------------------------------------------------
# Joining


def test_waiting_node_joins_a_serving_peer_with_newer_data_and_resyncs() -> None:
    serving = peer(State.ALONE, (6, PEER), (5, NODE))
    start = view(State.WAIT, (5, NODE), (5, NODE), yielding=True)

    joined, synced = run(start, heard(serving), ResyncDone("12 MiB in 0.4 s"))

    assert joined.view.state is State.SECOND
    assert joined.actions == (Action.BEGIN_RESYNC,)
    assert not joined.view.in_sync
    assert synced.view.state is State.SECOND
    assert synced.view.in_sync
    assert synced.view.memory.gen == synced.view.memory.synced == gen(6, PEER)
    assert not synced.view.memory.yielding
    assert synced.actions == ()
    assert synced.reason is not None and "12 MiB" in synced.reason


def test_alone_becomes_prim_when_its_second_is_in_sync() -> None:
    start = view(State.ALONE, (6, NODE), (5, NODE))

    d = last(start, heard(peer(State.SECOND, (6, NODE), (6, NODE), in_sync=True)))

    assert d.view.state is State.PRIM
    assert d.actions == ()
    assert d.view.memory.synced == d.view.memory.gen == gen(6, NODE)


def test_alone_stays_alone_while_its_second_resyncs() -> None:
    start = view(State.ALONE, (6, NODE), (5, NODE))

    d = last(start, heard(peer(State.SECOND, (5, NODE), (5, NODE), in_sync=False)))

    assert d.view.state is State.ALONE
    assert d.actions == () and d.reason is None


def both_waiting(mem1: Memory, mem2: Memory, **policy_changes: Any) -> tuple[Decision, Decision]:
    """Both nodes WAIT and hear each other: node1's and node2's decisions, same facts."""
    view1 = NodeView(policy(NODE, PEER, **policy_changes), State.WAIT, mem1)
    view2 = NodeView(policy(PEER, NODE, **policy_changes), State.WAIT, mem2)
    return (step(view1, heard(PeerView(State.WAIT, mem2))),
            step(view2, heard(PeerView(State.WAIT, mem1))))


def serving_nodes(d1: Decision, d2: Decision) -> list[str]:
    return [name for name, d in ((NODE, d1), (PEER, d2)) if d.view.state in SERVING]


@pytest.mark.parametrize(("defaultprim", "role1", "role2", "winner"), [
    (NODE, "second", "prim", NODE),
    (PEER, "prim", "second", PEER),
    ("alone", "second", "prim", PEER),
    ("alone", "prim", "second", NODE),
    ("alone", "prim", "prim", NODE),
    ("alone", "", "", NODE),
])
@pytest.mark.parametrize("history", [(0, ""), (5, NODE)])
def test_equal_data_elects_exactly_one_node(defaultprim: str, role1: str, role2: str,
                                            winner: str, history: GenSpec) -> None:
    d1, d2 = both_waiting(memory(history, last_role=role1), memory(history, last_role=role2),
                          defaultprim=defaultprim)

    assert serving_nodes(d1, d2) == [winner]
    for d in (d1, d2):
        if d.view.state in SERVING:
            assert d.actions == TAKE_OVER
        else:
            assert d.view.state is State.WAIT and d.actions == ()


def test_newer_data_wins_the_election_and_the_older_node_never_starts() -> None:
    newer, older = memory((6, NODE), (5, NODE)), memory((5, NODE), (5, NODE))

    d1, d2 = both_waiting(newer, older, defaultprim=PEER)

    assert d1.view.state is State.ALONE and d1.actions == TAKE_OVER
    assert d2.view.state is State.WAIT and d2.actions == ()


def _memory_grid() -> list[Memory]:
    gens = [(0, ""), (5, NODE), (6, NODE), (6, PEER), (7, PEER)]
    return [memory(g, s, role, y)
            for g in gens for s in [(0, ""), (5, NODE), (6, PEER)] if s[0] <= g[0]
            for role in ("", "prim") for y in (False, True)]


@pytest.mark.parametrize("defaultprim", ["alone", NODE, PEER])
def test_election_is_symmetric_for_every_pair_of_memories(defaultprim: str) -> None:
    grid = _memory_grid()
    for mem1 in grid:
        for mem2 in grid:
            d1, d2 = both_waiting(mem1, mem2, defaultprim=defaultprim)
            split = compare_data(mem1, mem2) is Verdict.SPLIT
            expected = 0 if split else 1
            assert len(serving_nodes(d1, d2)) == expected, (mem1, mem2)
            assert d1.view.split_brain == d2.view.split_brain == split, (mem1, mem2)


# ---------------------------------------------------------------------------------------------
# Split brain


SPLIT_HERE = ((6, NODE), (5, NODE))
SPLIT_THERE = ((6, PEER), (5, NODE))


def test_split_brain_in_wait_is_reported_once_and_nothing_starts() -> None:
    start = view(State.WAIT, *SPLIT_HERE)
    other = peer(State.WAIT, *SPLIT_THERE)

    first, again = run(start, heard(other), heard(other))

    assert first.view.state is State.WAIT
    assert first.view.split_brain
    assert first.actions == ()
    assert first.error
    assert first.reason is not None and "SPLIT BRAIN" in first.reason
    assert again.view.state is State.WAIT
    assert again.reason is None and again.actions == ()


def test_split_brain_between_two_serving_nodes_keeps_both_up_and_reports_it() -> None:
    start = view(State.ALONE, *SPLIT_HERE)

    d = last(start, heard(peer(State.ALONE, *SPLIT_THERE)))

    assert d.view.state is State.ALONE
    assert d.actions == ()
    assert d.view.split_brain
    assert d.reason is not None and "SPLIT BRAIN" in d.reason


def test_operator_resolves_split_brain_with_prim_and_the_other_side_resyncs() -> None:
    node1 = last(view(State.ALONE, *SPLIT_HERE), heard(peer(State.ALONE, *SPLIT_THERE)))
    node2 = last(view(State.ALONE, *SPLIT_THERE, pol=policy(PEER, NODE)),
                 heard(peer(State.ALONE, *SPLIT_HERE)))
    assert node1.view.split_brain and node2.view.split_brain

    kept = step(node1.view, cmd(Command.PRIM))
    assert kept.refused is None
    assert kept.view.state is State.ALONE
    assert kept.actions == ()  # already serving
    assert not kept.view.split_brain
    assert kept.view.memory.synced == gen(6, PEER)
    assert kept.view.memory.gen == gen(7, NODE)

    stepped_down = step(node2.view, heard(kept.view.advertised()))
    assert stepped_down.view.state is State.WAIT
    assert stepped_down.actions == STEP_DOWN
    assert not stepped_down.view.split_brain

    joined = step(stepped_down.view, heard(kept.view.advertised()))
    assert joined.view.state is State.SECOND
    assert joined.actions == (Action.BEGIN_RESYNC,)


def test_prim_in_wait_during_split_takes_over_and_the_peer_joins() -> None:
    node1 = last(view(State.WAIT, *SPLIT_HERE), heard(peer(State.WAIT, *SPLIT_THERE)))

    kept = step(node1.view, cmd(Command.PRIM))
    assert kept.view.state is State.ALONE and kept.actions == TAKE_OVER

    node2 = view(State.WAIT, *SPLIT_THERE, pol=policy(PEER, NODE), split_brain=True)
    joined = step(node2, heard(kept.view.advertised()))
    assert joined.view.state is State.SECOND
    assert not joined.view.split_brain


# ---------------------------------------------------------------------------------------------
# Failover


def prim_view(**changes: Any) -> NodeView:
    second = peer(State.SECOND, (5, NODE), (5, NODE), in_sync=True, last_role="second")
    return view(State.PRIM, (5, NODE), (5, NODE), peer_view=second, last_role="prim", **changes)


def second_view(in_sync: bool = True, pol: Policy | None = None, **changes: Any) -> NodeView:
    primary = peer(State.PRIM, (5, PEER), (5, PEER), last_role="prim")
    return view(State.SECOND, (5, PEER), (5, PEER), peer_view=primary, last_role="second",
                in_sync=in_sync, pol=pol, **changes)


def test_prim_continues_alone_when_its_second_vanishes() -> None:
    d = last(prim_view(), LOST)

    assert d.view.state is State.ALONE
    assert d.actions == ()
    assert d.view.memory.gen == gen(6, NODE)
    assert d.view.memory.synced == gen(5, NODE)


def test_isolated_prim_stops_the_application() -> None:
    d = last(prim_view(pol=policy(**WITNESS)), LOST_ISOLATED)

    assert d.view.state is State.WAIT
    assert d.actions == (Action.STOP_APP, Action.REMOVE_VIP)
    assert d.error


def test_secondary_takes_over_when_primary_crashes() -> None:
    d = last(second_view(), LOST)

    assert d.view.state is State.ALONE
    assert d.actions == TAKE_OVER
    assert d.view.memory.gen == gen(6, NODE)
    assert d.reason is not None and "in sync" in d.reason
    assert not d.view.in_sync


def test_secondary_not_in_sync_waits_when_primary_crashes() -> None:
    d = last(second_view(in_sync=False), LOST)

    assert d.view.state is State.WAIT
    assert Action.START_APP not in d.actions
    assert d.reason is not None and "not current" in d.reason


def test_secondary_waits_when_failover_is_off() -> None:
    d = last(second_view(pol=policy(failover=False)), LOST)

    assert d.view.state is State.WAIT
    assert d.actions == ()
    assert d.reason is not None and "failover is off" in d.reason


@pytest.mark.parametrize(("loss", "expected"), [
    (LOST_ISOLATED, State.WAIT),
    (LOST_WITNESS_OK, State.ALONE),
])
def test_secondary_takes_over_only_if_the_witness_agrees(loss: PeerLost,
                                                          expected: State) -> None:
    d = last(second_view(pol=policy(**WITNESS)), loss)

    assert d.view.state is expected
    assert d.actions == (TAKE_OVER if expected is State.ALONE else ())


@pytest.mark.parametrize("primary_now", [State.STOP, State.WAIT])
def test_secondary_takes_over_when_the_primary_stops(primary_now: State) -> None:
    d = last(second_view(), heard(peer(primary_now, (5, PEER), (5, PEER), last_role="prim")))

    assert d.view.state is State.ALONE
    assert d.actions == TAKE_OVER
    assert d.view.memory.gen == gen(6, NODE)


@pytest.mark.parametrize("defaultprim", ["alone", PEER])
def test_prim_continues_alone_when_the_peer_waits_with_equal_data(defaultprim: str) -> None:
    start = prim_view(pol=policy(defaultprim=defaultprim))

    d = last(start, heard(peer(State.WAIT, (5, NODE), (5, NODE), last_role="second")))

    assert d.view.state is State.ALONE
    assert d.actions == ()


def test_alone_steps_down_for_a_waiting_peer_with_strictly_newer_data() -> None:
    start = view(State.ALONE, (6, NODE), (5, NODE))

    d = last(start, heard(peer(State.WAIT, (7, PEER), (6, NODE))))

    assert d.view.state is State.WAIT
    assert d.actions == STEP_DOWN


# ---------------------------------------------------------------------------------------------
# The primary went ALONE while its secondary still believed itself in sync (heartbeats lost in
# one direction, or the secondary never heard the loss).


def test_secondary_resyncs_when_its_primary_continued_alone() -> None:
    primary, secondary = prim_view(), second_view(pol=policy(PEER, NODE))
    secondary = replace(secondary, memory=primary.memory, peer=primary.advertised())

    alone = step(primary, LOST)  # only node1 missed heartbeats
    d = step(secondary, heard(alone.view.advertised()))

    assert d.view.state is State.SECOND
    assert not d.view.in_sync
    assert d.actions == (Action.BEGIN_RESYNC,)

    # ... so that node2 never takes over with data that lacks node1's ALONE writes,
    assert last(d.view, PeerLost("no heartbeat from node1")).view.state is State.WAIT
    # and the pair returns to PRIM/SECOND once the resync is done.
    synced = step(d.view, ResyncDone())
    assert synced.view.memory.gen == alone.view.memory.gen
    assert step(alone.view, heard(synced.view.advertised())).view.state is State.PRIM


def test_secondary_does_not_take_over_from_a_stopped_peer_that_wrote_alone() -> None:
    secondary = view(State.SECOND, (5, NODE), (5, NODE), in_sync=True,
                     peer_view=peer(State.PRIM, (5, NODE)), pol=policy(PEER, NODE))

    d = step(secondary, heard(peer(State.STOP, (6, NODE), (5, NODE), last_role="prim")))

    assert d.view.state is State.WAIT
    assert Action.START_APP not in d.actions


# ---------------------------------------------------------------------------------------------
# Operator commands in every state


STATE_VIEWS = {
    State.STOP: view(State.STOP, (5, NODE), (5, NODE)),
    State.WAIT: view(State.WAIT, (5, NODE), (5, NODE),
                     peer_view=peer(State.WAIT, (5, NODE), (5, NODE))),
    State.ALONE: view(State.ALONE, (6, NODE), (5, NODE), last_role="prim",
                      peer_view=peer(State.WAIT, (5, NODE), (5, NODE))),
    State.PRIM: prim_view(),
    State.SECOND: second_view(),
}


@dataclass(frozen=True)
class Expect:
    state: State | None  # None: refused
    actions: tuple[Action, ...] = ()
    in_reason: str = ""  # for refusals: in the refusal
    yielding: bool | None = None
    handover: bool | None = None


REFUSED = Expect(None)
C = Command
S = State
COMMAND_TABLE: list[tuple[State, Command, Expect]] = [
    (S.STOP, C.START, Expect(S.WAIT)),
    (S.STOP, C.STOP, REFUSED),
    (S.STOP, C.RESTART, REFUSED),
    (S.STOP, C.SWAP, REFUSED),
    (S.STOP, C.PRIM, Expect(S.ALONE, TAKE_OVER, "forced primary")),
    (S.STOP, C.SECOND, Expect(S.WAIT, yielding=True)),
    (S.WAIT, C.START, REFUSED),
    (S.WAIT, C.STOP, Expect(S.STOP)),
    (S.WAIT, C.RESTART, REFUSED),
    (S.WAIT, C.SWAP, REFUSED),
    (S.WAIT, C.PRIM, Expect(S.ALONE, TAKE_OVER, "forced primary")),
    (S.WAIT, C.SECOND, Expect(S.WAIT, yielding=True)),
    (S.ALONE, C.START, REFUSED),
    (S.ALONE, C.STOP, Expect(S.STOP, STEP_DOWN)),
    (S.ALONE, C.RESTART, Expect(S.ALONE, RESTART_APP, "restart")),
    (S.ALONE, C.SWAP, REFUSED),
    (S.ALONE, C.PRIM, Expect(None, in_reason="already primary")),
    (S.ALONE, C.SECOND, Expect(S.WAIT, STEP_DOWN, yielding=True)),
    (S.PRIM, C.START, REFUSED),
    (S.PRIM, C.STOP, Expect(S.STOP, STEP_DOWN)),
    (S.PRIM, C.RESTART, Expect(S.PRIM, RESTART_APP, "restart")),
    (S.PRIM, C.SWAP, Expect(S.SECOND, STEP_DOWN, "swap", handover=True)),
    (S.PRIM, C.PRIM, Expect(None, in_reason="already primary")),
    (S.PRIM, C.SECOND, Expect(S.SECOND, STEP_DOWN, handover=True)),
    (S.SECOND, C.START, REFUSED),
    (S.SECOND, C.STOP, Expect(S.STOP)),
    (S.SECOND, C.RESTART, REFUSED),
    (S.SECOND, C.SWAP, Expect(None, in_reason=PEER)),
    (S.SECOND, C.PRIM, Expect(None, in_reason="swap")),
    (S.SECOND, C.SECOND, REFUSED),
]


def test_command_table_covers_every_state_and_command() -> None:
    assert {(s, c) for s, c, _ in COMMAND_TABLE} == {(s, c) for s in State for c in Command}


def check_command(start: NodeView, command: Command, expect: Expect) -> Decision:
    d = step(start, cmd(command))
    if expect.state is None:
        assert d.refused, "expected a refusal"
        assert expect.in_reason in d.refused
        assert d.view == start
        assert d.actions == ()
        return d
    assert d.refused is None
    assert d.view.state is expect.state
    assert d.actions == expect.actions
    assert d.reason is not None and expect.in_reason in d.reason
    if expect.yielding is not None:
        assert d.view.memory.yielding is expect.yielding
    if expect.handover is not None:
        assert d.view.handover is expect.handover
        assert d.view.in_sync  # a handing-over SECOND holds everything the primary wrote
    return d


@pytest.mark.parametrize(("state", "command", "expect"), COMMAND_TABLE,
                         ids=[f"{s}-{c}" for s, c, _ in COMMAND_TABLE])
def test_command_in_state(state: State, command: Command, expect: Expect) -> None:
    check_command(STATE_VIEWS[state], command, expect)


SERVING_PEER = peer(State.ALONE, (6, PEER), (5, NODE))


@pytest.mark.parametrize(("label", "start", "command", "expect"), [
    ("prim in WAIT while the peer serves", view(State.WAIT, (5, NODE),
                                                 peer_view=SERVING_PEER),
     C.PRIM, Expect(None, in_reason="serving")),
    ("prim in STOP while the peer serves", view(State.STOP, (5, NODE), peer_view=SERVING_PEER),
     C.PRIM, Expect(None, in_reason="serving")),
    ("prim on ALONE during a split brain", view(State.ALONE, *SPLIT_HERE, split_brain=True,
                                                 peer_view=peer(State.ALONE, *SPLIT_THERE)),
     C.PRIM, Expect(S.ALONE, (), "forced primary")),
    ("second on ALONE without a peer", view(State.ALONE, (6, NODE), (5, NODE)),
     C.SECOND, Expect(None, in_reason="not running")),
])
def test_command_in_special_situations(label: str, start: NodeView, command: Command,
                                       expect: Expect) -> None:
    check_command(start, command, expect)


def test_prim_absorbs_the_peer_generation_so_the_peer_resyncs_from_here() -> None:
    start = view(State.WAIT, (5, NODE), (5, NODE),
                 peer_view=peer(State.WAIT, (7, PEER), (5, NODE)))

    d = step(start, cmd(Command.PRIM))

    assert d.view.memory.synced == gen(7, PEER)
    assert d.view.memory.gen == gen(8, NODE)
    assert start.peer is not None
    assert compare_data(d.view.memory, start.peer.memory) is Verdict.ME


def test_second_on_a_stopped_node_joins_the_serving_peer_at_once() -> None:
    start = view(State.STOP, (6, NODE), (5, NODE), peer_view=peer(State.ALONE, (6, PEER),
                                                                  (5, NODE)))

    d = step(start, cmd(Command.SECOND))

    # Both wrote alone, but this node yields: the peer's data wins without a split brain.
    assert d.view.state is State.SECOND
    assert d.actions == (Action.BEGIN_RESYNC,)
    assert d.view.memory.yielding


# ---------------------------------------------------------------------------------------------
# Swap and autoswap


def pair_prim_second(**policy_changes: Any) -> tuple[NodeView, NodeView]:
    """node1 PRIM, node2 SECOND in sync, each holding the other's latest heartbeat."""
    mem = memory((5, NODE), (5, NODE))
    node1 = NodeView(policy(NODE, PEER, **policy_changes), State.PRIM,
                     replace(mem, last_role="prim"))
    node2 = NodeView(policy(PEER, NODE, **policy_changes), State.SECOND,
                     replace(mem, last_role="second"), in_sync=True)
    return (replace(node1, peer=node2.advertised()), replace(node2, peer=node1.advertised()))


def test_swap_moves_the_application_without_resync() -> None:
    node1, node2 = pair_prim_second()

    swapped = step(node1, cmd(Command.SWAP))
    assert swapped.view.state is State.SECOND
    assert swapped.view.handover and swapped.view.in_sync
    assert swapped.actions == STEP_DOWN

    took_over = step(node2, heard(swapped.view.advertised()))
    assert took_over.view.state is State.PRIM
    assert took_over.actions == TAKE_OVER

    settled = step(swapped.view, heard(took_over.view.advertised()))
    assert settled.view.state is State.SECOND
    assert not settled.view.handover
    assert settled.view.in_sync
    assert settled.actions == ()

    for d in (swapped, took_over, settled):
        assert d.view.memory.gen == d.view.memory.synced == gen(5, NODE)
        assert Action.BEGIN_RESYNC not in d.actions
    assert step(took_over.view, heard(settled.view.advertised())).view.state is State.PRIM


@pytest.mark.parametrize(("autoswap", "expected"), [(True, State.SECOND), (False, State.PRIM)])
def test_autoswap_hands_over_to_the_default_primary(autoswap: bool, expected: State) -> None:
    node1, node2 = pair_prim_second(defaultprim=PEER, autoswap=autoswap)

    d = step(node1, heard(node2.advertised()))

    assert d.view.state is expected
    if autoswap:
        assert d.view.handover and d.actions == STEP_DOWN
        assert d.reason is not None and "autoswap" in d.reason
        # The preferred node takes over and does not swap back.
        back = step(node2, heard(d.view.advertised()))
        assert back.view.state is State.PRIM
        assert step(back.view, heard(d.view.advertised())).view.state is State.PRIM


# ---------------------------------------------------------------------------------------------
# errd


def check(now: float, count: int = 0, action: str = "restart") -> ProcessCheck:
    return ProcessCheck("postgres", count, 1, action, now)


@pytest.mark.parametrize("state", [State.ALONE, State.PRIM])
def test_errd_restarts_up_to_maxloop_then_stops_the_module(state: State) -> None:
    start = STATE_VIEWS[state]

    decisions = run(start, check(0.0), check(10.0), check(20.0), check(30.0))

    for k, d in enumerate(decisions[:3], start=1):
        assert d.view.state is state
        assert d.actions == RESTART_APP
        assert d.error
        assert d.reason is not None and f"restart {k} of 3" in d.reason
    stopped = decisions[3]
    assert stopped.view.state is State.STOP
    assert stopped.actions == STEP_DOWN
    assert stopped.error
    assert stopped.reason is not None and "maxloop" in stopped.reason


def test_errd_forgets_restarts_older_than_the_loop_interval() -> None:
    start = replace(STATE_VIEWS[State.ALONE], policy=policy(loop_interval_s=100.0))

    decisions = run(start, check(0.0), check(10.0), check(20.0), check(105.0), check(230.0))

    assert [d.view.state for d in decisions] == [State.ALONE] * 5
    assert decisions[3].reason is not None and "restart 3 of 3" in decisions[3].reason
    assert decisions[4].reason is not None and "restart 1 of 3" in decisions[4].reason


@pytest.mark.parametrize("state", [State.ALONE, State.PRIM])
def test_errd_action_stop_stops_the_module_at_once(state: State) -> None:
    d = step(STATE_VIEWS[state], check(0.0, action="stop"))

    assert d.view.state is State.STOP
    assert d.actions == STEP_DOWN
    assert d.error


@pytest.mark.parametrize("state", [State.SECOND, State.WAIT, State.STOP])
def test_errd_is_ignored_where_the_application_does_not_run(state: State) -> None:
    start = STATE_VIEWS[state]
    for action in ("restart", "stop"):
        assert step(start, check(0.0, action=action)) == Decision(start)


@pytest.mark.parametrize("state", [State.ALONE, State.PRIM])
def test_errd_does_nothing_while_enough_processes_run(state: State) -> None:
    start = STATE_VIEWS[state]
    assert step(start, check(0.0, count=1)) == Decision(start)
    assert step(start, check(0.0, count=3, action="stop")) == Decision(start)


def test_errd_stop_makes_the_secondary_take_over() -> None:
    node1, node2 = pair_prim_second()

    stopped = step(node1, check(0.0, action="stop"))
    d = step(node2, heard(stopped.view.advertised()))

    assert d.view.state is State.ALONE and d.actions == TAKE_OVER


# ---------------------------------------------------------------------------------------------
# VIP interface


def test_interface_down_moves_the_application_to_the_secondary() -> None:
    node1, node2 = pair_prim_second()

    down = step(node1, InterfaceChanged("eth0", up=False))
    assert down.view.state is State.WAIT
    assert down.actions == STEP_DOWN
    assert down.error
    assert not down.view.interface_ok

    took_over = step(node2, heard(down.view.advertised()))
    assert took_over.view.state is State.ALONE
    assert took_over.actions == TAKE_OVER

    # While its interface is down node1 does not even join; once it is up, it re-evaluates.
    still = step(down.view, heard(took_over.view.advertised()))
    assert still.view.state is State.WAIT and still.actions == ()
    up = step(still.view, InterfaceChanged("eth0", up=True))
    assert up.view.state is State.SECOND
    assert up.actions == (Action.BEGIN_RESYNC,)


def test_interface_up_in_wait_starts_alone_if_allowed() -> None:
    start = view(State.WAIT, (6, NODE), (5, NODE), peer_absent=True, interface_ok=False)

    d = step(start, InterfaceChanged("eth0", up=True))

    assert d.view.state is State.ALONE and d.actions == TAKE_OVER


def test_secondary_with_its_interface_down_does_not_take_over() -> None:
    d = last(second_view(), InterfaceChanged("eth0", up=False), LOST)

    assert d.view.state is State.WAIT
    assert Action.START_APP not in d.actions


# ---------------------------------------------------------------------------------------------
# Heartbeat payload


def test_peer_view_payload_round_trip() -> None:
    original = peer(State.SECOND, (7, PEER), (6, NODE), in_sync=True, handover=True,
                    last_role="second", yielding=True)

    assert PeerView.from_payload(original.to_payload()) == original


def test_memory_json_round_trip() -> None:
    original = memory((3, NODE), (2, PEER), "prim", True)

    assert Memory.from_json(original.to_json()) == original


GOOD = peer(State.PRIM, (3, NODE), (3, NODE)).to_payload()


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """GOOD with one field replaced (value ...: the field removed)."""
    payload = {**GOOD, "m": dict(GOOD["m"])}
    target = payload["m"] if len(path) == 2 else payload
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return payload


@pytest.mark.parametrize("payload", [
    {},
    [],
    None,
    "PRIM",
    _with(("s",), ...),
    _with(("s",), "BOSS"),
    _with(("s",), ["PRIM"]),
    _with(("m",), ...),
    _with(("m",), 5),
    _with(("m",), "memory"),
    _with(("m", "gen"), ...),
    _with(("m", "synced"), ...),
    _with(("m", "gen"), [3]),
    _with(("m", "gen"), [-1, NODE]),
    _with(("m", "gen"), ["3", NODE]),
    _with(("m", "gen"), [3, 1]),
    _with(("m", "gen"), [True, NODE]),
    _with(("m", "gen"), "3/node1"),
    _with(("m", "yielding"), "no"),
    _with(("m", "last_role"), 1),
    _with(("in",), ...),
    _with(("in",), "false"),
    _with(("ho",), ...),
    _with(("ho",), 1),
], ids=repr)
def test_malformed_payload_is_a_value_error(payload: Any) -> None:
    with pytest.raises(ValueError):
        PeerView.from_payload(payload)


# ---------------------------------------------------------------------------------------------
# Random walk over two nodes


@dataclass
class Node:
    """One node in the walk: its view, plus what the adapters would have done with its actions
    (application running, VIP held) and a model of its replicated data (write ids)."""

    view: NodeView
    app: bool = False
    vip: bool = False
    data: frozenset[int] = frozenset()


@dataclass
class Walk:
    rng: random.Random
    nodes: list[Node]
    forcing: bool = True  # the operator may use `prim` and `second` (else only on a split brain)
    link_up: bool = True
    now: float = 0.0
    next_write: int = 0
    trace: list[str] = field(default_factory=list)
    seen: set[State] = field(default_factory=set)
    takeovers: int = 0
    checked_takeovers: int = 0  # takeovers whose data was checked (link up, nothing forced)
    splits: int = 0
    # An operator's `prim` or `second` was accepted since the pair last settled (link up) with
    # equal data or as PRIM + SECOND: until then, data the operator chose to discard may be lost.
    forced: bool = False

    def fail(self, message: str) -> None:
        tail = "\n".join(self.trace[-30:])
        pytest.fail(f"{message}\nlast events:\n{tail}")

    def apply(self, i: int, event: Event) -> Decision:
        """Step node i, check the per-decision invariants and play its actions."""
        node, other = self.nodes[i], self.nodes[1 - i]
        before = node.view
        d = step(before, event)
        self.trace.append(f"{before.policy.node} {before.state} + {event!r} -> "
                          f"{d.view.state} {[a.value for a in d.actions]} {d.reason or ''}"
                          f"{d.refused or ''}")
        if d.refused is not None:
            if not d.refused or d.view != before or d.actions:
                self.fail("a refusal changed the view or ran actions")
            return d
        if d.view.state is not before.state and d.reason is None:
            self.fail("a state change without a reason")
        if (d.actions or d.error) and d.reason is None:
            self.fail("actions or an error without a reason")
        for action in d.actions:
            self.play(node, action)
        if node.app != (d.view.state in SERVING) or node.vip != (d.view.state in SERVING):
            self.fail(f"application running={node.app}, VIP held={node.vip} "
                      f"in state {d.view.state}")
        if isinstance(event, CommandEvent) and event.command in (Command.PRIM, Command.SECOND):
            self.forced = True
        entered_serving = d.view.state in SERVING and before.state not in SERVING
        if entered_serving:
            self.takeovers += 1
            # Only an operator (`prim` here, `second` there) may throw acknowledged writes away;
            # across a cut link both sides may serve, which the split-brain report covers.
            if self.link_up and not self.forced:
                self.checked_takeovers += 1
                if not node.data >= other.data:
                    self.fail(f"{before.policy.node} started the application without writes "
                              f"{sorted(other.data - node.data)} that "
                              f"{before.policy.peer} holds")
        if d.view.split_brain and not before.split_brain:
            self.splits += 1
        node.view = d.view
        self.seen.add(d.view.state)
        return d

    def play(self, node: Node, action: Action) -> None:
        match action:
            case Action.ADD_VIP | Action.REMOVE_VIP:
                adding = action is Action.ADD_VIP
                if node.vip == adding:
                    self.fail(f"{action} while VIP held={node.vip}")
                node.vip = adding
            case Action.START_APP | Action.STOP_APP:
                starting = action is Action.START_APP
                if node.app == starting:
                    self.fail(f"{action} while application running={node.app}")
                node.app = starting
            case Action.BEGIN_RESYNC:
                pass  # the copy is modelled when ResyncDone is accepted

    def exchange(self, first: int) -> None:
        """Deliver heartbeats both ways until nothing changes (the link is up)."""
        quiet = 0
        for n in range(60):
            i = (first + n) % 2
            before = self.nodes[i].view
            self.apply(i, PeerHeard(self.nodes[1 - i].view.advertised()))
            quiet = quiet + 1 if self.nodes[i].view == before else 0
            if quiet == 2:
                self.check_settled()
                return
        self.fail("heartbeat exchange does not settle (the nodes flap)")

    def check_settled(self) -> None:
        a, b = self.nodes
        if a.data == b.data:
            self.forced = False  # the operator's choice reached both nodes; nothing left to lose
        if a.view.state in SERVING and b.view.state in SERVING \
                and not (a.view.split_brain and b.view.split_brain):
            self.fail("both nodes serve after exchanging heartbeats, without a split brain")
        for me, other in ((a, b), (b, a)):
            if me.view.state is State.SECOND and me.view.in_sync:
                if me.data != other.data:
                    self.fail(f"{me.view.policy.node} is SECOND in sync but lacks "
                              f"{sorted(other.data - me.data)}")
                if other.view.state is not State.PRIM \
                        or other.view.memory.gen != me.view.memory.gen:
                    self.fail(f"{me.view.policy.node} is SECOND in sync at generation "
                              f"{me.view.memory.gen} but {other.view.policy.node} is "
                              f"{other.view.state} at {other.view.memory.gen}")
            if me.view.state is State.PRIM:
                if not (other.view.state is State.SECOND and other.view.in_sync):
                    self.fail(f"{me.view.policy.node} is PRIM without an in-sync SECOND")
                self.forced = False

    def random_event(self) -> None:
        rng = self.rng
        i = rng.randrange(2)
        node, other = self.nodes[i], self.nodes[1 - i]
        self.now += rng.uniform(0, 3600)
        kind = rng.choices(
            ["command", "write", "resync_done", "resync_failed", "errd", "iface", "link",
             "lost"],
            weights=[30, 25, 12, 2, 4, 4, 4, 10])[0]
        match kind:
            case "command":
                if not self.forcing and node.view.split_brain and rng.random() < 0.3:
                    command = Command.PRIM  # the documented way out of a split brain
                else:
                    forcing = [0.4, 0.6] if self.forcing else [0, 0]  # prim, second
                    command = rng.choices(list(Command), weights=[10, 6, 2, 3, *forcing])[0]
                self.apply(i, CommandEvent(command, origin="walk"))
            case "write":
                self.write(node, other)
                return
            case "resync_done":
                if not (self.link_up and node.view.state is State.SECOND):
                    return
                if self.apply(i, ResyncDone()).view.in_sync:
                    node.data = other.data
            case "resync_failed":
                self.apply(i, ResyncFailed("connection reset"))
            case "errd":
                action = rng.choice(["restart", "restart", "stop"])
                self.apply(i, ProcessCheck("app", 0, 1, action, self.now))
            case "iface":
                self.apply(i, InterfaceChanged("eth0", up=rng.random() < 0.6))
            case "link":
                self.link_up = not self.link_up
                self.trace.append(f"link {'up' if self.link_up else 'down'}")
            case "lost":
                if self.link_up:
                    return
                witness = None if not node.view.policy.witness else rng.random() < 0.5
                self.apply(i, PeerLost("walk", witness_ok=witness))
        if self.link_up:
            self.exchange(first=rng.randrange(2))

    def write(self, node: Node, other: Node) -> None:
        """The application writes on a serving node; PRIM replicates synchronously."""
        if node.view.state is State.ALONE:
            node.data = node.data | {self.next_write}
        elif node.view.state is State.PRIM and self.link_up:
            node.data = node.data | {self.next_write}
            other.data = other.data | {self.next_write}
        else:
            return  # not serving, or PRIM blocked until it declares the peer lost
        self.trace.append(f"{node.view.policy.node} writes {self.next_write}")
        self.next_write += 1


WALK_POLICIES = {
    "default": {},
    "defaultprim-node2": {"defaultprim": PEER},
    "autoswap": {"defaultprim": PEER, "autoswap": True},
    "witness": {"witness": True},
    "failover-off": {"failover": False},
    "maxloop-1": {"maxloop": 1, "loop_interval_s": 7200.0},
}


@pytest.mark.parametrize("forcing", [True, False], ids=["prim-second", "no-prim-second"])
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", list(WALK_POLICIES))
def test_random_walk_keeps_the_invariants(name: str, seed: int, forcing: bool) -> None:
    changes = WALK_POLICIES[name]
    walk = Walk(random.Random(f"{name}-{seed}-{forcing}"), [
        Node(NodeView(policy(NODE, PEER, **changes))),
        Node(NodeView(policy(PEER, NODE, **changes))),
    ], forcing=forcing)
    walk.exchange(first=0)
    for _ in range(3000):
        walk.random_event()

    # The walk is not vacuous: it visited every state, failed over, wrote, and (without forced
    # commands) checked the data of many takeovers.
    assert walk.seen == set(State)
    assert walk.takeovers > 20
    assert walk.next_write > 50
    if name == "default":
        assert walk.splits > 0
    if not forcing:
        assert walk.checked_takeovers > 10


def test_waiting_node_starts_when_its_stopped_peer_holds_the_same_data() -> None:
    # Fresh pair, node2's module started while node1's is stopped: which node starts first
    # decides (defaultprim="alone"); a STOP peer with equal data does not compete.
    for me, other in (("node1", "node2"), ("node2", "node1")):
        start = replace(view(State.WAIT), policy=policy(node=me, peer_name=other))
        d = last(start, heard(peer(State.STOP)))
        assert d.view.state is State.ALONE, me
        assert d.actions == (Action.ADD_VIP, Action.START_APP)


def test_broken_replication_makes_the_primary_alone_with_a_new_generation() -> None:
    from appliance.cluster import ReplicationLost
    start = view(State.PRIM, gen=(3, NODE), synced=(3, NODE))
    d = last(start, ReplicationLost("no ack for 600 ms"))
    assert d.view.state is State.ALONE and d.actions == ()
    assert d.view.memory.gen == gen(4, NODE)
    assert d.reason is not None and "no ack" in d.reason
    for other in (State.ALONE, State.SECOND, State.WAIT, State.STOP):
        assert last(view(other), ReplicationLost("x")).view.state is other


def test_isolated_primary_steps_down_before_the_peer_takes_over() -> None:
    from appliance.cluster import Isolated
    witness = policy(witness=True)
    d = last(view(State.PRIM, gen=(3, NODE), synced=(3, NODE), pol=witness),
             Isolated("no heartbeat and no witness for 300 ms"))
    assert d.view.state is State.WAIT
    assert d.actions == (Action.STOP_APP, Action.REMOVE_VIP)
    assert d.error and d.reason is not None and "isolated" in d.reason
    # Without a witness there is no way to tell isolation from a dead peer: keep serving.
    no_witness = view(State.PRIM, gen=(3, NODE), synced=(3, NODE))
    assert last(no_witness, Isolated("x")).view.state is State.PRIM
    for other in (State.ALONE, State.SECOND, State.WAIT, State.STOP):
        assert last(view(other, pol=witness), Isolated("x")).view.state is other


def test_a_second_whose_copy_is_being_rebuilt_is_not_in_sync() -> None:
    from appliance.cluster import ResyncStarted
    d = last(replace(view(State.SECOND, gen=(3, PEER), synced=(3, PEER)), in_sync=True),
             ResyncStarted())
    assert d.view.state is State.SECOND and not d.view.in_sync
    assert d.reason is not None and "not current" in d.reason
    # ...so losing the primary now must not start the application here.
    after = last(d.view, LOST)
    assert after.view.state is State.WAIT and Action.START_APP not in after.actions
