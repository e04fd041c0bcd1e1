"""Byte-for-byte description of a directory tree, to compare two nodes' copies."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any


def describe(top: Path) -> dict[str, tuple[Any, ...]]:
    """Per relative path: type, mode, owner, size, mtime (ns), content digest, allocated blocks
    rounded to "sparse or not", link count, symlink target. Hard links appear under each name
    with the same link count."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(top))
            kind = stat.S_IFMT(st.st_mode)
            content: Any = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
                sparse = st.st_blocks * 512 < st.st_size
            else:
                sparse = False
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size,
                        st.st_mtime_ns, content, sparse, nlink, target)
    return out


def differences(a: Path, b: Path) -> list[str]:
    da, db = describe(a), describe(b)
    problems = [f"only in {a}: {p}" for p in sorted(da.keys() - db.keys())]
    problems += [f"only in {b}: {p}" for p in sorted(db.keys() - da.keys())]
    problems += [f"{p}: {da[p]} != {db[p]}" for p in sorted(da.keys() & db.keys())
                 if da[p] != db[p]]
    return problems
