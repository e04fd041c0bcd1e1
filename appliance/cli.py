"""`mirrorha ...`: the operator's command line. Errors are one line on stderr and a non-zero exit,
never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

from appliance import control
from appliance.cluster import Command
from appliance.errors import MirrorhaError
from appliance.paths import DEFAULT_MODULE, Paths


def unit_path() -> Path:
    # Overridable so that tests (and image builds into a chroot) do not touch the host's /etc.
    return Path(os.environ.get("MIRRORHA_UNIT_DIR", "/etc/systemd/system")) / "mirrorha.service"


def _paths(args: argparse.Namespace) -> Paths:
    return Paths.from_env(args.module)


def cmd_daemon(args: argparse.Namespace) -> int:
    from appliance.daemon import run_daemon
    return run_daemon(_paths(args), start=args.start)


def cmd_state(args: argparse.Namespace) -> int:
    state = control.get_state(_paths(args).control_socket)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    peer = state["peer_state"] or "unreachable"
    sync = " (in sync)" if state["state"] == "SECOND" and state["in_sync"] else ""
    vips = ", ".join(f"{v['addr']}{' held' if v['held'] else ''}" for v in state["vip"]) or "-"
    print(f"{state['node']}: {state['state']}{sync}   peer {state['peer']}: {peer}")
    print(f"generation {state['generation']}   VIP {vips}"
          + ("   SPLIT BRAIN" if state["split_brain"] else ""))
    if state["busy"]:
        print(f"busy: {state['busy']}")
    return 0


def _module_command(command: Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        origin = args.identity or "operator"
        control.send_command(_paths(args).control_socket, command, origin)
        print(f"{command.value}: accepted")
        return 0
    return run


def _tail(path: Path, lines: int, follow: bool) -> int:
    if not path.exists():
        raise MirrorhaError(f"{path}: no log yet")
    with open(path, errors="replace") as f:
        content = f.readlines()
        sys.stdout.writelines(content[-lines:])
        sys.stdout.flush()
        while follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.2)  # polling a growing file: there is nothing to wait on
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    return _tail(_paths(args).module_log, args.lines, args.follow)


def cmd_applog(args: argparse.Namespace) -> int:
    return _tail(_paths(args).app_log, args.lines, args.follow)


def _script_log(level: str) -> Callable[[argparse.Namespace], int]:
    """printi / printe from start_prim and stop_prim. When the daemon is busy or gone the line
    still reaches the module log: scripts must never block on logging."""
    def run(args: argparse.Namespace) -> int:
        message = " ".join(args.message)
        paths = _paths(args)
        try:
            control.request(paths.control_socket, {"op": "log", "level": level,
                                                   "message": message}, timeout=2)
        except (control.DaemonUnreachable, TimeoutError, OSError):
            from appliance.modlog import ModuleLog
            node = os.environ.get("MIRRORHA_NODE", platform.node())
            writer = ModuleLog(paths.module_log, node)
            (writer.error if level == "E" else writer.info)(f"script: {message}")
        return 0
    return run


def cmd_config_check(args: argparse.Namespace) -> int:
    from appliance.config import load_cluster, load_node_config, load_userconfig
    paths = _paths(args)
    userconfig = Path(args.userconfig) if args.userconfig else paths.userconfig
    cluster_xml = Path(args.cluster) if args.cluster else paths.cluster_xml
    if cluster_xml.exists():
        config = load_node_config(cluster_xml, userconfig)
        service = config.service
        load_cluster(cluster_xml)
    else:
        service = load_userconfig(userconfig)
    for warning in service.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{userconfig}: OK")
    return 0


def cmd_cluster_init(args: argparse.Namespace) -> int:
    from appliance.config import load_cluster
    from appliance.keys import init_cluster
    paths = _paths(args)
    if args.nodes:
        nodes = args.nodes.split(",")
    else:
        nodes = [n.name for n in load_cluster(paths.cluster_xml).nodes]
    init_cluster(paths, nodes, force=args.force)
    print(f"cluster key, CA and certificates for {', '.join(nodes)} created in {paths.home}. "
          "Install them on the peer: `mirrorha cluster export PEER > bundle` here, copy the "
          "file, then `mirrorha cluster import bundle` there.")
    return 0


def cmd_cluster_export(args: argparse.Namespace) -> int:
    from appliance.keys import export_bundle
    print(export_bundle(_paths(args), args.peer))
    return 0


def cmd_cluster_import(args: argparse.Namespace) -> int:
    from appliance.keys import import_bundle
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    paths = _paths(args)
    import_bundle(paths, text, args.file)
    print(f"cluster key and certificates installed in {paths.home}")
    return 0


def unit_text(exe: str, home: Path) -> str:
    return f"""[Unit]
Description=mirrorha high-availability node daemon
After=network-online.target
Wants=network-online.target

[Service]
Environment=MIRRORHA_HOME={home}
ExecStart={exe} daemon --start
KillSignal=SIGTERM
# SIGTERM to the daemon only: it stops the application itself, in order (stop_prim, VIP, then
# tells the peer); whatever is left afterwards is still SIGKILLed by systemd.
KillMode=mixed
TimeoutStopSec=900
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def cmd_boot(args: argparse.Namespace) -> int:
    print(set_boot(_paths(args), args.mode == "on"))
    return 0


def boot_enabled() -> bool:
    return unit_path().exists()


def set_boot(paths: Paths, on: bool) -> str:
    """`mirrorha boot on|off` (also the console's boot toggle); returns what was done."""
    exe = shutil.which("mirrorha") or sys.argv[0]
    has_systemd = Path("/run/systemd/system").is_dir()
    unit = unit_path()
    if on:
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text(unit_text(str(Path(exe).resolve()), paths.home))
        if has_systemd:
            subprocess.run(["systemctl", "daemon-reload"], check=True)
            subprocess.run(["systemctl", "enable", "mirrorha.service"], check=True)
            return "boot start on: mirrorha.service enabled"
        return (f"boot start on: {unit} written; systemd is not running here, so it will be "
                "enabled when the unit is loaded (`systemctl enable mirrorha`)")
    if has_systemd and unit.exists():
        subprocess.run(["systemctl", "disable", "mirrorha.service"], check=False)
    unit.unlink(missing_ok=True)
    return "boot start off"


def cmd_snapshot(args: argparse.Namespace) -> int:
    paths = _paths(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.output or f"mirrorha-snapshot-{platform.node()}-{stamp}.zip")
    with open(out, "wb") as f:
        write_snapshot(paths, f)
    print(f"snapshot written to {out} (the cluster key is never included)")
    return 0


def write_snapshot(paths: Paths, out: BinaryIO) -> None:
    """The snapshot zip (`mirrorha snapshot`, the console's snapshot button): configuration,
    scripts, logs, state and versions; never the cluster key or a private key."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for path in _snapshot_files(paths):
            data = _read_no_follow(path, SNAPSHOT_FILE_BYTES)
            if data is not None:
                z.writestr(str(path.relative_to(paths.home)), data)
        try:
            state = control.get_state(paths.control_socket)
        except MirrorhaError as e:
            state = {"error": str(e)}
        z.writestr("state.json", json.dumps(state, indent=2))
        z.writestr("versions.txt", _versions())


def _snapshot_files(paths: Paths) -> list[Path]:
    """Regular files only, and only inside the module (or home for cluster.xml): a symlink
    planted in the log directory must not smuggle /etc/shadow into a zip anyone may ask for."""
    files = [paths.cluster_xml, paths.userconfig, paths.state_file]
    for folder in (paths.bin_dir, paths.log_dir):
        if folder.is_dir() and confined(paths, folder / "x"):
            files.extend(p for p in sorted(folder.iterdir()))
    return [p for p in files if p.is_file() and not p.is_symlink() and confined(paths, p)]


def confined(paths: Paths, path: Path) -> bool:
    """No directory between the home and `path` is a symbolic link: what is read or written
    there stays inside the home (a module's bin/ linked to /usr/local/bin is not the module's).
    `path` itself may be one: readers open it with O_NOFOLLOW, writers replace the link."""
    d = paths.home
    for part in path.relative_to(paths.home).parts[:-1]:
        d = d / part
        if d.is_symlink():
            return False
    return True


SNAPSHOT_FILE_BYTES = 16 << 20  # of each file: the end of a huge log is what support reads


def _read_no_follow(path: Path, limit: int) -> bytes | None:
    """The file's content, or None if it became a symlink (or vanished) since it was listed.
    A file over `limit` bytes (a log never rotated) gives its last lines within the limit,
    after a line saying how much was left out: never a gigabyte read into memory."""
    try:
        # O_NONBLOCK: a file swapped for a FIFO since it was listed must not hang the snapshot
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        size = st.st_size
        if size <= limit:
            return f.read()
        f.seek(size - limit)
        data = f.read(limit)
        cut = data.find(b"\n") + 1
        if 0 < cut < len(data):  # from a line start, unless the window is all one line
            data = data[cut:]
        left_out = size - len(data)
        return f"[mirrorha snapshot: the first {left_out} bytes of this file are left out]\n" \
            .encode() + data


def _versions() -> str:
    lines = [f"mirrorha {metadata.version('mirrorha')}", f"python {platform.python_version()}",
             f"kernel {platform.release()}", f"host {platform.node()}"]
    for dist in ("pyroute2", "psutil", "defusedxml"):
        try:
            lines.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{dist} missing")
    return "\n".join(lines) + "\n"


def cmd_console(args: argparse.Namespace) -> int:
    if args.console_cmd == "passwd":
        return cmd_console_passwd(args)
    from appliance.console.server import run
    return run(args.bind)


def cmd_console_passwd(args: argparse.Namespace) -> int:
    import getpass

    from appliance.console.auth import ConsoleFiles, set_password
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("new admin password: ")
        if getpass.getpass("again: ") != password:
            raise MirrorhaError("the two passwords differ; nothing changed")
    files = ConsoleFiles(Paths.from_env().home)
    set_password(files, password)
    print(f"admin password set ({files.admin})")
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from appliance import lab
    return lab.main(args.lab_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirrorha", description="two-node HA with synchronous "
                                "replication")
    # Scripts run by the daemon get MIRRORHA_MODULE, so `$SAFE/safekit stop` acts on their module.
    p.add_argument("-m", "--module", default=os.environ.get("MIRRORHA_MODULE", DEFAULT_MODULE),
                   help="module name (default: $MIRRORHA_MODULE or mirror)")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("daemon", help="run the node daemon (systemd runs this)")
    d.add_argument("--start", action="store_true", help="start the module at once (boot start)")
    d.set_defaults(func=cmd_daemon)

    s = sub.add_parser("state", help="state of this node and its peer")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_state)

    for command, text in [
        (Command.START, "start the module (WAIT, then a role)"),
        (Command.STOP, "stop the module (the peer takes over)"),
        (Command.RESTART, "restart the application locally (stop_prim, start_prim)"),
        (Command.SWAP, "swap roles: the SECOND becomes primary"),
        (Command.PRIM, "force this node primary: its data becomes the reference"),
        (Command.SECOND, "force this node secondary: its data will be replaced by the peer's"),
    ]:
        c = sub.add_parser(command.value, help=text)
        c.add_argument("-i", "--identity", help="who asks (logged), e.g. start_prim")
        c.set_defaults(func=_module_command(command))

    for name, func, text in [("log", cmd_log, "module log"),
                             ("applog", cmd_applog, "application log")]:
        c = sub.add_parser(name, help=text)
        c.add_argument("-n", "--lines", type=int, default=50)
        c.add_argument("-f", "--follow", action="store_true")
        c.set_defaults(func=func)

    for name, level in [("printi", "I"), ("printe", "E")]:
        c = sub.add_parser(name, help=f"write to the module log ({level}) from a script")
        c.add_argument("message", nargs="+")
        c.set_defaults(func=_script_log(level))

    cfg = sub.add_parser("config", help="configuration")
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True)
    chk = cfg_sub.add_parser("check", help="validate userconfig.xml (and cluster.xml)")
    chk.add_argument("--userconfig", help="file to check (default: the module's)")
    chk.add_argument("--cluster", help="cluster.xml (default: the node's)")
    chk.set_defaults(func=cmd_config_check)

    cl = sub.add_parser("cluster", help="cluster key")
    cl_sub = cl.add_subparsers(dest="cluster_cmd", required=True)
    init = cl_sub.add_parser("init", help="create the cluster key, CA and node certificates "
                                          "(once, on one node)")
    init.add_argument("--force", action="store_true")
    init.add_argument("--nodes", help="node names, comma-separated (default: from cluster.xml)")
    init.set_defaults(func=cmd_cluster_init)
    exp = cl_sub.add_parser("export", help="print what the peer needs (key, certificates)")
    exp.add_argument("peer", help="the peer's node name")
    exp.set_defaults(func=cmd_cluster_export)
    imp = cl_sub.add_parser("import", help="install the key exported on the peer")
    imp.add_argument("file", help="file holding the key, or - for stdin")
    imp.set_defaults(func=cmd_cluster_import)

    b = sub.add_parser("boot", help="start the module at boot (systemd unit)")
    b.add_argument("mode", choices=["on", "off"])
    b.set_defaults(func=cmd_boot)

    sn = sub.add_parser("snapshot", help="zip of config, scripts, logs, state and versions")
    sn.add_argument("-o", "--output")
    sn.set_defaults(func=cmd_snapshot)

    con = sub.add_parser("console", help="the web console and REST API (HTTPS, :9010)")
    con.add_argument("--bind", default="0.0.0.0:9010", help="ADDR:PORT (default 0.0.0.0:9010)")
    con.set_defaults(func=cmd_console, console_cmd=None)
    con_sub = con.add_subparsers(dest="console_cmd")
    pw = con_sub.add_parser("passwd", help="set the console's admin password")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of standard input")

    lab = sub.add_parser("lab", help="two-node lab in network namespaces", add_help=False)
    lab.add_argument("lab_args", nargs=argparse.REMAINDER)
    lab.set_defaults(func=cmd_lab)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MirrorhaError as e:
        print(f"mirrorha: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        print(f"mirrorha: {' '.join(map(str, e.cmd))} failed with exit code {e.returncode}",
              file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `mirrorha log | head`: the reader went away; nothing to report.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flush at exit must not fail
        return 0
    except OSError as e:
        print(f"mirrorha: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
