"""The decision core: a pure, synchronous state machine (no clock, socket or subprocess).

`step(view, event) -> Decision`: the node's current view and one input event in, the next view,
the actions to run and one reason sentence out. Time and the peer arrive as events. Everything
the adapters do (VIP, scripts, heartbeats, replication) is decided here, so every transition is
unit-testable in microseconds and every transition has a reason for the module log.

States (as in SafeKit): STOP (module stopped), WAIT (started, cannot or must not serve yet),
ALONE (primary without a synchronised peer), PRIM (primary with a synchronised SECOND),
SECOND (application stopped, holding the replicated copy).

Data generations decide who holds the newest data. A generation is (counter, writer). A node
bumps it each time it becomes primary without a synchronised peer (ALONE): "from here on only I
have these writes". `synced` is the last generation both nodes shared while in sync. A node whose
generation is above the common synced one has written alone since; if both have, it is a split
brain and nothing is overwritten automatically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import Any


class State(StrEnum):
    STOP = "STOP"
    WAIT = "WAIT"
    ALONE = "ALONE"
    PRIM = "PRIM"
    SECOND = "SECOND"


SERVING = frozenset({State.ALONE, State.PRIM})


class Action(StrEnum):
    ADD_VIP = "add_vip"
    REMOVE_VIP = "remove_vip"
    START_APP = "start_app"
    STOP_APP = "stop_app"
    BEGIN_RESYNC = "begin_resync"


# Taking over: the address first, so the application can bind it. Stepping down: the application
# first, so no client is served by a half-stopped application, then the address.
TAKE_OVER = (Action.ADD_VIP, Action.START_APP)
STEP_DOWN = (Action.STOP_APP, Action.REMOVE_VIP)
RESTART_APP = (Action.STOP_APP, Action.START_APP)


class Command(StrEnum):
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    SWAP = "swap"
    PRIM = "prim"
    SECOND = "second"


@dataclass(frozen=True, order=True)
class Generation:
    counter: int = 0
    writer: str = ""

    def as_list(self) -> list[Any]:
        return [self.counter, self.writer]

    @classmethod
    def from_list(cls, value: Any) -> Generation:
        if (
            not isinstance(value, list | tuple)
            or len(value) != 2
            or not isinstance(value[0], int)
            or isinstance(value[0], bool)
            or not isinstance(value[1], str)
            or value[0] < 0
        ):
            raise ValueError(f"bad generation {value!r}")
        return cls(value[0], value[1])

    def __str__(self) -> str:
        return f"{self.counter}/{self.writer or '-'}"


@dataclass(frozen=True)
class Memory:
    """What a node must remember across restarts (persisted before actions run)."""

    gen: Generation = Generation()
    synced: Generation = Generation()
    last_role: str = ""  # "prim" | "second" | "": resumes roles when data is equal
    yielding: bool = False  # operator said `second`: this node's data loses any comparison

    @property
    def wrote_alone(self) -> bool:
        return self.gen != self.synced

    def to_json(self) -> dict[str, Any]:
        return {
            "gen": self.gen.as_list(),
            "synced": self.synced.as_list(),
            "last_role": self.last_role,
            "yielding": self.yielding,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Memory:
        return cls(
            gen=Generation.from_list(data["gen"]),
            synced=Generation.from_list(data["synced"]),
            last_role=_typed(data.get("last_role", ""), str, "last_role"),
            yielding=_typed(data.get("yielding", False), bool, "yielding"),
        )


def _typed(value: Any, kind: type, field: str) -> Any:
    """`value` if it has the expected type; bool("false") is True, so never coerce."""
    if not isinstance(value, kind):
        raise ValueError(f"bad {field} {value!r}: expected {kind.__name__}")
    return value


@dataclass(frozen=True)
class PeerView:
    """The peer as its latest authenticated heartbeat describes it."""

    state: State
    memory: Memory
    in_sync: bool = False
    handover: bool = False

    def to_payload(self) -> dict[str, Any]:
        return {
            "s": self.state.value,
            "m": self.memory.to_json(),
            "in": self.in_sync,
            "ho": self.handover,
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> PeerView:
        """Raises ValueError on anything malformed (the caller counts and ignores it)."""
        try:
            return cls(
                state=State(data["s"]),
                memory=Memory.from_json(data["m"]),
                in_sync=_typed(data["in"], bool, "in_sync"),
                handover=_typed(data["ho"], bool, "handover"),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad heartbeat payload: {e}") from None


@dataclass(frozen=True)
class Policy:
    """The configuration the decisions depend on (from userconfig.xml)."""

    node: str
    peer: str
    defaultprim: str = "alone"
    failover: bool = True
    autoswap: bool = False
    maxloop: int = 3
    loop_interval_s: float = 24 * 3600.0
    witness: bool = False


@dataclass(frozen=True)
class NodeView:
    policy: Policy
    state: State = State.STOP
    memory: Memory = Memory()
    peer: PeerView | None = None  # None: not heard (yet, or since it was lost)
    peer_absent: bool = False  # True once the heartbeat layer declared the peer silent
    in_sync: bool = False  # SECOND only: holds every byte the primary acknowledged
    handover: bool = False  # SECOND after a swap: tells the peer to take over now
    split_brain: bool = False
    interface_ok: bool = True
    witness_ok: bool | None = None  # witness reachability reported with the last peer loss
    restarts: tuple[float, ...] = ()  # times of errd restarts inside loop_interval

    def advertised(self) -> PeerView:
        """What this node tells its peer about itself."""
        return PeerView(self.state, self.memory, self.in_sync, self.handover)


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class CommandEvent:
    command: Command
    origin: str = "operator"


@dataclass(frozen=True)
class PeerHeard:
    peer: PeerView


@dataclass(frozen=True)
class PeerLost:
    detail: str  # e.g. "no heartbeat from node1 on 2/2 networks for 612 ms"
    witness_ok: bool | None = None  # None when no witness is configured


@dataclass(frozen=True)
class ResyncDone:
    detail: str = ""


@dataclass(frozen=True)
class ResyncStarted:
    """The secondary's copy is being rebuilt from scratch: it is no longer current."""


@dataclass(frozen=True)
class ResyncFailed:
    detail: str


@dataclass(frozen=True)
class Isolated:
    """The primary has heard neither its peer nor the witness for half the heartbeat timeout:
    it is probably the isolated side, and the peer will take over at the full timeout."""

    detail: str


@dataclass(frozen=True)
class ReplicationLost:
    """The primary's replication stream broke (no ack in time, secondary I/O error...)."""

    detail: str


@dataclass(frozen=True)
class ProcessCheck:
    name: str
    count: int
    atleast: int
    action: str  # "restart" | "stop"
    now: float


@dataclass(frozen=True)
class InterfaceChanged:
    interface: str
    up: bool


Event = (
    CommandEvent | PeerHeard | PeerLost | Isolated | ResyncDone | ResyncStarted | ResyncFailed
    | ReplicationLost
    | ProcessCheck | InterfaceChanged
)


@dataclass(frozen=True)
class Decision:
    view: NodeView
    actions: tuple[Action, ...] = ()
    reason: str | None = None  # one sentence for the module log; None: nothing worth logging
    error: bool = False  # the reason reports a fault (logged at error level)
    refused: str | None = None  # an operator command that makes no sense now, and why

    @property
    def changed_state(self) -> bool:
        return self.reason is not None


# ---------------------------------------------------------------------------------------------
# Who holds the newest data


class Verdict(Enum):
    ME = "me"
    PEER = "peer"
    SPLIT = "split"
    EQUAL = "equal"


def compare_data(me: Memory, peer: Memory) -> Verdict:
    """Whose data is newer. Symmetric: both nodes reach the same answer from the same facts."""
    if me.yielding != peer.yielding:
        return Verdict.PEER if me.yielding else Verdict.ME
    base = max(me.synced.counter, peer.synced.counter)
    me_ahead = me.gen.counter > base
    peer_ahead = peer.gen.counter > base
    if me_ahead and peer_ahead and me.gen != peer.gen:
        return Verdict.SPLIT
    if me.gen.counter != peer.gen.counter:
        return Verdict.ME if me.gen.counter > peer.gen.counter else Verdict.PEER
    if me.gen != peer.gen:
        return Verdict.SPLIT
    return Verdict.EQUAL


def elect(me: Memory, peer: Memory, policy: Policy, peer_name: str) -> Verdict:
    """Which node should serve when neither does: the newest data, then the preference."""
    verdict = compare_data(me, peer)
    return _prefer(me, peer, policy, peer_name) if verdict is Verdict.EQUAL else verdict


def _prefer(me: Memory, peer: Memory, policy: Policy, peer_name: str) -> Verdict:
    """Equal data: the configured default primary, else the previous primary, else the name."""
    if policy.defaultprim in (policy.node, peer_name):
        return Verdict.ME if policy.defaultprim == policy.node else Verdict.PEER
    if (me.last_role == "prim") != (peer.last_role == "prim"):
        return Verdict.ME if me.last_role == "prim" else Verdict.PEER
    return Verdict.ME if policy.node < peer_name else Verdict.PEER


def may_start_without_peer(view: NodeView) -> str | None:
    """None if this node may serve while the peer is absent, else why not (cold-start rule).

    Only a node that wrote alone since the last sync knows that it holds the newest data; a node
    that was PRIM or SECOND cannot know whether its peer served alone after it stopped.
    """
    mem, pol = view.memory, view.policy
    if mem.yielding:
        return "the operator made this node secondary (`mirrorha second`); waiting for the peer"
    if pol.witness and view.witness_ok is False:
        return f"{pol.peer} and the witness are both unreachable; this node may be isolated"
    if mem.wrote_alone:
        return None
    if mem.gen.counter == 0:
        if pol.defaultprim in ("alone", pol.node):
            return None
        return f"first start: defaultprim is {pol.defaultprim}; waiting for it"
    return (
        f"data generation {mem.gen} may be stale: {pol.peer} may have served alone since; "
        f"waiting for {pol.peer} (or force with `mirrorha prim`)"
    )


# ---------------------------------------------------------------------------------------------
# Transitions


def _go(view: NodeView, state: State, actions: tuple[Action, ...], reason: str, *,
        error: bool = False, **changes: Any) -> Decision:
    mem = changes.pop("memory", view.memory)
    if state in SERVING:
        mem = replace(mem, last_role="prim")
    elif state is State.SECOND:
        mem = replace(mem, last_role="second")
    changes["memory"] = mem
    if state is not State.SECOND:
        changes.setdefault("in_sync", False)
        changes.setdefault("handover", False)
    new = replace(view, state=state, **changes)
    return Decision(new, actions, reason, error)


def _stay(view: NodeView, **changes: Any) -> Decision:
    return Decision(replace(view, **changes) if changes else view)


def _refuse(view: NodeView, why: str) -> Decision:
    return Decision(view, refused=why)


def _alone(view: NodeView, actions: tuple[Action, ...], reason: str) -> Decision:
    """Become primary without a synchronised peer: bump the generation first."""
    mem = view.memory
    peer_counter = view.peer.memory.gen.counter if view.peer else 0
    gen = Generation(max(mem.gen.counter, peer_counter) + 1, view.policy.node)
    return _go(view, State.ALONE, actions, reason, memory=replace(mem, gen=gen, yielding=False))


def step(view: NodeView, event: Event) -> Decision:
    match event:
        case CommandEvent():
            return _command(view, event)
        case PeerHeard(peer=peer):
            return _reconsider(replace(view, peer=peer, peer_absent=False, witness_ok=None))
        case PeerLost():
            return _peer_lost(replace(view, peer=None, peer_absent=True,
                                      witness_ok=event.witness_ok), event)
        case ResyncDone():
            return _resync_done(view, event)
        case ResyncStarted():
            if view.state is not State.SECOND or not view.in_sync:
                return _stay(view)
            return Decision(replace(view, in_sync=False), (),
                            f"{view.policy.peer} started a full copy: this node's data is not "
                            "current until it completes")
        case ResyncFailed():
            return _resync_failed(view, event)
        case Isolated():
            if view.state is not State.PRIM or not view.policy.witness:
                return _stay(view)
            # Stepping down at half the timeout leaves the other half for stop_prim to finish
            # before the peer, which still reaches the witness, starts the application.
            return _go(view, State.WAIT, STEP_DOWN,
                       f"{event.detail}: this node is probably isolated; stopping the "
                       "application before the peer takes over", error=True)
        case ReplicationLost():
            if view.state is not State.PRIM:
                return _stay(view)
            return _alone(view, (), f"replication to {view.policy.peer} broken ({event.detail}); "
                                    "continuing ALONE, the secondary will resynchronise")
        case ProcessCheck():
            return _process_check(view, event)
        case InterfaceChanged():
            return _interface(view, event)
    raise TypeError(f"unknown event {event!r}")


def _reconsider(view: NodeView) -> Decision:
    """Re-evaluate the state against the latest facts about the peer."""
    match view.state:
        case State.STOP:
            return _stay(view)
        case State.WAIT:
            return _waiting(view)
        case State.SECOND:
            return _second(view)
        case State.ALONE | State.PRIM:
            return _serving(view)


def _peer_lost(view: NodeView, event: PeerLost) -> Decision:
    pol = view.policy
    match view.state:
        case State.PRIM:
            if pol.witness and event.witness_ok is False:
                return _go(view, State.WAIT, STEP_DOWN,
                           f"{event.detail}; the witness is unreachable too: this node may be "
                           "isolated, stopping the application", error=True)
            return _alone(view, (), f"{event.detail}; continuing ALONE (the peer is "
                                    "resynchronised when it returns)")
        case State.SECOND:
            why_not = _why_not_take_over(view)
            if why_not:
                return _go(view, State.WAIT, (), f"{event.detail}; {why_not}", error=True)
            return _alone(view, TAKE_OVER,
                          f"{event.detail}; data was in sync at loss; taking the VIP and "
                          "starting the application")
        case State.WAIT:
            return _waiting(view, event.detail)
        case _:
            return _stay(view)


def _why_not_take_over(view: NodeView) -> str | None:
    pol = view.policy
    if not view.in_sync:
        return "this node's data is not current (resynchronisation was not finished); waiting"
    if not pol.failover:
        return "failover is off; waiting for the operator (`mirrorha prim`)"
    if pol.witness and view.witness_ok is False:
        return "the witness is unreachable too: this node may be isolated; not taking over"
    if not view.interface_ok:
        return "the VIP interface is down; not taking over"
    return None


def _waiting(view: NodeView, context: str | None = None) -> Decision:
    pol, peer = view.policy, view.peer
    prefix = f"{context}; " if context else ""
    if not view.interface_ok:
        return _stay(view)
    if peer is None:
        if not view.peer_absent:
            return _stay(view)  # not heard yet: the heartbeat layer will tell us within timeout
        why_not = may_start_without_peer(view)
        if why_not:
            return _stay(view) if context is None else Decision(
                view, (), f"{prefix}staying in WAIT: {why_not}")
        return _alone(view, TAKE_OVER,
                      f"{prefix}{pol.peer} is absent and this node holds the newest data "
                      f"(generation {view.memory.gen}); starting ALONE")
    if peer.state in SERVING:
        verdict = compare_data(view.memory, peer.memory)
        if verdict is Verdict.SPLIT:
            return _report_split(view)
        if verdict in (Verdict.PEER, Verdict.EQUAL):
            return _go(view, State.SECOND, (Action.BEGIN_RESYNC,),
                       f"{pol.peer} is {peer.state} with the newest data (generation "
                       f"{peer.memory.gen}); joining as SECOND and resynchronising",
                       split_brain=False)
        return _stay(view)  # newer data here: the serving peer steps down (see _serving)
    # A stopped peer is not competing to serve: equal data is enough to start (the peer just
    # told us it holds nothing newer). Two waiting nodes break the tie by preference.
    verdict = (compare_data(view.memory, peer.memory) if peer.state is State.STOP
               else elect(view.memory, peer.memory, pol, pol.peer))
    if verdict is Verdict.EQUAL:
        verdict = Verdict.PEER if pol.defaultprim == pol.peer else Verdict.ME
    if verdict is Verdict.SPLIT:
        return _report_split(view)
    if peer.state in (State.WAIT, State.STOP) and verdict is Verdict.ME:
        return _alone(view, TAKE_OVER,
                      f"{pol.peer} is {peer.state} and this node holds the newest data "
                      f"(generation {view.memory.gen} vs {peer.memory.gen}); starting as primary")
    return _stay(view)


def _report_split(view: NodeView) -> Decision:
    if view.split_brain:
        return _stay(view)
    peer = view.peer
    assert peer is not None
    return Decision(
        replace(view, split_brain=True), (),
        f"SPLIT BRAIN: both nodes wrote while apart (here generation {view.memory.gen}, "
        f"{view.policy.peer} {peer.memory.gen}); nothing is overwritten. Run `mirrorha prim` on "
        "the node whose data must be kept", error=True)


def _second(view: NodeView) -> Decision:
    pol, peer = view.policy, view.peer
    assert peer is not None
    if view.in_sync and peer.memory.gen != view.memory.gen:
        # The peer wrote a generation this node does not hold: it went ALONE while this node
        # still believed itself in sync (heartbeats lost one way only). Taking over now would
        # lose those writes.
        view = replace(view, in_sync=False, handover=False)
        if peer.state in SERVING:
            return _go(view, State.SECOND, (Action.BEGIN_RESYNC,),
                       f"{pol.peer} is {peer.state} with generation {peer.memory.gen} that this "
                       f"node does not hold ({view.memory.gen}); resynchronising", in_sync=False)
    if peer.state in SERVING:
        return _stay(view, handover=False)
    if peer.state is State.SECOND:
        if peer.handover and view.in_sync:
            return _go(view, State.PRIM, TAKE_OVER,
                       f"{pol.peer} handed over (swap); taking the VIP and starting the "
                       "application")
        return _stay(view)
    # The primary is stopping or restarting: it ran stop_prim before saying so.
    why_not = _why_not_take_over(view)
    if why_not:
        return _go(view, State.WAIT, (), f"{pol.peer} is {peer.state}; {why_not}", error=True)
    return _alone(view, TAKE_OVER,
                  f"{pol.peer} is {peer.state} and this node's data is in sync; taking the VIP "
                  "and starting the application")


def _serving(view: NodeView) -> Decision:
    pol, peer = view.policy, view.peer
    assert peer is not None
    if peer.state in SERVING or peer.state in (State.WAIT, State.STOP):
        # Both serving: the preference breaks a tie; otherwise a serving node keeps serving
        # unless the peer strictly holds newer data.
        verdict = (elect(view.memory, peer.memory, pol, pol.peer) if peer.state in SERVING
                   else compare_data(view.memory, peer.memory))
        if verdict is Verdict.SPLIT:
            return _report_split(view)
        if verdict is Verdict.PEER and peer.state in SERVING | {State.WAIT}:
            return _go(view, State.WAIT, STEP_DOWN,
                       f"{pol.peer} holds newer data (generation {peer.memory.gen} vs "
                       f"{view.memory.gen}); stepping down to resynchronise from it",
                       split_brain=False)
        if view.state is State.PRIM:
            return _alone(view, (), f"{pol.peer} left the cluster ({peer.state}); "
                                    "continuing ALONE")
        return _stay(view)
    # peer is SECOND
    synced = peer.in_sync and peer.memory.gen == view.memory.gen
    if view.state is State.ALONE:
        if synced:
            return _go(view, State.PRIM, (),
                       f"{pol.peer} is SECOND and synchronised (generation {view.memory.gen})",
                       memory=replace(view.memory, synced=view.memory.gen), split_brain=False)
        return _stay(view)
    if not synced:
        return _alone(view, (), f"{pol.peer} is SECOND but no longer synchronised; continuing "
                                "ALONE")
    if pol.autoswap and pol.defaultprim == pol.peer:
        return _handover(view, f"autoswap: {pol.peer} is the preferred primary and is in sync")
    return _stay(view)


def _handover(view: NodeView, why: str) -> Decision:
    return _go(view, State.SECOND, STEP_DOWN,
               f"{why}; stopping the application and handing over to {view.policy.peer}",
               in_sync=True, handover=True)


def _resync_done(view: NodeView, event: ResyncDone) -> Decision:
    if view.state is not State.SECOND or view.peer is None or view.in_sync:
        return _stay(view)
    gen = view.peer.memory.gen
    detail = f" ({event.detail})" if event.detail else ""
    return Decision(
        replace(view, in_sync=True,
                memory=replace(view.memory, gen=gen, synced=gen, yielding=False)),
        (), f"resynchronised from {view.policy.peer}{detail}; SECOND is in sync "
            f"(generation {gen})")


def _resync_failed(view: NodeView, event: ResyncFailed) -> Decision:
    if view.state is not State.SECOND:
        return _stay(view)
    return _go(view, State.WAIT, (), f"resynchronisation failed: {event.detail}", error=True)


def _process_check(view: NodeView, event: ProcessCheck) -> Decision:
    if view.state not in SERVING or event.count >= event.atleast:
        return _stay(view)
    pol = view.policy
    what = (f"process {event.name}: {event.count} running, at least {event.atleast} "
            "expected")
    if event.action == "stop":
        return _go(view, State.STOP, STEP_DOWN, f"{what}; action stop: stopping the module",
                   error=True)
    recent = tuple(t for t in view.restarts if event.now - t < pol.loop_interval_s)
    hours = f"{pol.loop_interval_s / 3600:g} h"
    if len(recent) < pol.maxloop:
        return Decision(
            replace(view, restarts=(*recent, event.now)), RESTART_APP,
            f"{what}; restarting the application (restart {len(recent) + 1} of "
            f"{pol.maxloop} within {hours})", error=True)
    return _go(view, State.STOP, STEP_DOWN,
               f"{what}; already restarted {len(recent)} times within {hours} (maxloop): "
               f"stopping the module so that {pol.peer} takes over", error=True,
               restarts=recent)


def _interface(view: NodeView, event: InterfaceChanged) -> Decision:
    view = replace(view, interface_ok=event.up)
    if event.up:
        return _reconsider(view) if view.state is State.WAIT else _stay(view)
    if view.state in SERVING:
        return _go(view, State.WAIT, STEP_DOWN,
                   f"interface {event.interface} of the VIP is down; stopping the application "
                   "so that the peer takes over", error=True, interface_ok=False)
    return _stay(view)


# ---------------------------------------------------------------------------------------------
# Operator commands


def _command(view: NodeView, event: CommandEvent) -> Decision:
    handler = _COMMANDS[event.command]
    return handler(view, event.origin)


def _cmd_start(view: NodeView, origin: str) -> Decision:
    if view.state is not State.STOP:
        return _refuse(view, f"the module is already started ({view.state})")
    waiting = _go(view, State.WAIT, (), f"started by {origin}; waiting for {view.policy.peer}",
                  split_brain=False, restarts=())
    follow = _waiting(waiting.view)
    if follow.reason:
        return Decision(follow.view, follow.actions,
                        f"{waiting.reason}; {follow.reason}", follow.error)
    why_not = may_start_without_peer(waiting.view) if view.peer_absent else None
    if why_not:
        return replace(waiting, reason=f"{waiting.reason}; {why_not}")
    return waiting


def _cmd_stop(view: NodeView, origin: str) -> Decision:
    if view.state is State.STOP:
        return _refuse(view, "the module is already stopped")
    actions = STEP_DOWN if view.state in SERVING else ()
    return _go(view, State.STOP, actions, f"stopped by {origin}")


def _cmd_restart(view: NodeView, origin: str) -> Decision:
    if view.state not in SERVING:
        return _refuse(view, f"the application does not run on a {view.state} node; nothing "
                             "to restart")
    return Decision(view, RESTART_APP,
                    f"restart by {origin}: stopping and starting the application locally")


def _cmd_swap(view: NodeView, origin: str) -> Decision:
    peer = view.policy.peer
    if view.state is State.SECOND:
        return _refuse(view, f"run swap on the primary ({peer})")
    if view.state is not State.PRIM:
        return _refuse(view, f"swap needs PRIM with a synchronised SECOND; this node is "
                             f"{view.state}")
    return _handover(view, f"swap requested by {origin}")


def _cmd_prim(view: NodeView, origin: str) -> Decision:
    peer = view.peer
    if view.state is State.PRIM or (view.state is State.ALONE and not view.split_brain):
        return _refuse(view, f"this node is already primary ({view.state})")
    if view.state is State.SECOND:
        return _refuse(view, f"this node is SECOND of {view.policy.peer}; use `mirrorha swap` "
                             "on the primary")
    if peer is not None and peer.state in SERVING and not view.split_brain:
        return _refuse(view, f"{view.policy.peer} is {peer.state} and serving; stop it first")
    # The operator declares this node's data the reference: absorb the peer's generation so the
    # peer (if any) sees itself behind and resynchronises from here.
    mem = view.memory
    absorbed = peer.memory.gen if peer is not None else mem.synced
    counter = max(mem.gen.counter, absorbed.counter) + 1
    new_mem = replace(mem, gen=Generation(counter, view.policy.node), synced=absorbed,
                      yielding=False, last_role="prim")
    actions = () if view.state is State.ALONE else TAKE_OVER
    return _go(view, State.ALONE, actions,
               f"forced primary by {origin}: this node's data (generation "
               f"{new_mem.gen}) is now the reference", memory=new_mem, split_brain=False)


def _cmd_second(view: NodeView, origin: str) -> Decision:
    peer = view.peer
    if view.state is State.SECOND:
        return _refuse(view, "this node is already SECOND")
    if view.state is State.PRIM:
        return _handover(view, f"`second` requested by {origin}")
    mem = replace(view.memory, yielding=True)
    if view.state is State.ALONE:
        if peer is None:
            return _refuse(view, f"{view.policy.peer} is not running: no primary to follow")
        return _go(view, State.WAIT, STEP_DOWN,
                   f"forced secondary by {origin}: this node's data will be replaced by "
                   f"{view.policy.peer}'s", memory=mem, split_brain=False)
    state = State.WAIT
    base = _go(view, state, (), f"forced secondary by {origin}: waiting to resynchronise from "
                                f"{view.policy.peer}", memory=mem, split_brain=False)
    follow = _waiting(base.view)
    if follow.reason:
        return Decision(follow.view, follow.actions, f"{base.reason}; {follow.reason}")
    return base


_COMMANDS = {
    Command.START: _cmd_start,
    Command.STOP: _cmd_stop,
    Command.RESTART: _cmd_restart,
    Command.SWAP: _cmd_swap,
    Command.PRIM: _cmd_prim,
    Command.SECOND: _cmd_second,
}


def initial_view(policy: Policy, memory: Memory | None = None) -> NodeView:
    return NodeView(policy=policy, memory=memory or Memory())

