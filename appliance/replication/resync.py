"""Full resynchronisation: the primary streams its whole replicated directory as ops.

The stream is RESET (the secondary sets its previous content aside), then the tree exactly as a
reintegration into an empty directory sends it (reintegrate.py: each directory before what it
holds, data extents only so that holes stay holes, hard links as LINK, attributes and mtimes
last), then (sent by the caller once everything is durable on the secondary) RESYNC_DONE. Used
after a split brain, where the secondary's divergent data must be kept aside, not compared.
The caller guarantees the tree does not change while it is walked (the mounts are frozen).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from appliance.replication import reintegrate
from appliance.replication.journal import Dirt
from appliance.replication.protocol import Op, OpKind

Submit = Callable[[Op], Awaitable[None]]


async def full_copy(root: int, root_fd: int, submit: Submit) -> reintegrate.Stats:
    """Stream the directory open as `root_fd` (opened before the FUSE mount) as replicated dir
    number `root`."""
    await submit(Op(OpKind.RESET, root, ""))
    return await reintegrate.sync_pass(root, root_fd, reintegrate.Side({}), Dirt(), None,
                                       "checksum", submit, _nothing_to_compare, workers=1)


async def _nothing_to_compare(op: Op) -> bytes:
    raise AssertionError(f"a copy into an empty directory compares nothing ({op.kind.name})")
