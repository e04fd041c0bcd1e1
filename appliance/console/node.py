"""What a console does on its own node: module files (read, validate, deploy), the daemon
(state, commands, starting it when needed), logs, snapshot, boot start and how fresh the data
is. Every operation here is also what the peer API exposes to the other node's console, so both
consoles drive both nodes through the same code (`LocalNode` here, `peer.RemoteNode` there).

Nothing here changes cluster state itself: commands go to the daemon over its control socket.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from appliance import cli, control
from appliance.cluster import Command, Memory
from appliance.config import ServiceConfig, load_cluster, parse_node_config, parse_userconfig
from appliance.errors import CommandRefused, ConfigError, MirrorhaError
from appliance.files import stage_file
from appliance.paths import Paths
from appliance.waiting import wait_until

MODULE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
TEMPLATE = "mirror"
USERCONFIG = "conf/userconfig.xml"
SCRIPTS = ("bin/start_prim", "bin/stop_prim")
MODULE_FILES = (USERCONFIG, *SCRIPTS)
LOG_FILES = {"module": "module.log", "application": "application.log"}
MAX_FILE_BYTES = 256 * 1024  # a userconfig.xml or a script; anything bigger is a mistake
MAX_LOG_LINES = 5000
FOLLOW_WAIT_S = 10.0
DAEMON_START_S = 20.0  # the daemon answers its control socket well within this
DAEMON_STOP_S = 30.0
SYSTEMCTL_S = 60.0  # systemctl start (restart: twice that)
FRESHNESS_MAX_ENTRIES = 200_000  # counting files must not take minutes on a huge tree


class ConsoleError(MirrorhaError):
    """An API error: HTTP status, a stable code, a sentence for humans, field errors."""

    def __init__(self, status: int, code: str, message: str,
                 fields: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or []

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "fields": self.fields}}


def node_name() -> str:
    """This node's name: $MIRRORHA_NODE (the lab sets it), else the host name."""
    return os.environ.get("MIRRORHA_NODE") or platform.node()


def version() -> str:
    try:
        return metadata.version("mirrorha")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_module(module: str) -> None:
    if not MODULE_RE.fullmatch(module):
        raise ConsoleError(404, "not_found", f"no module {module!r}")


def field_error(file: str, line: int | None, field: str, message: str) -> dict[str, Any]:
    return {"file": file, "line": line, "field": field, "message": message}


# ---------------------------------------------------------------------------------------------
# The mirror template: what a new module starts from (the reference's mirror.safe, filled in)


@dataclass(frozen=True)
class Settings:
    """The simple form of the module page."""

    vip: str | None = None
    replicated_dirs: tuple[str, ...] = ()
    pulse_ms: int = 700
    timeout_ms: int = 30000

    def to_json(self) -> dict[str, Any]:
        return {"vip": self.vip, "replicated_dirs": list(self.replicated_dirs),
                "pulse_ms": self.pulse_ms, "timeout_ms": self.timeout_ms}

    @classmethod
    def from_json(cls, data: Any) -> Settings:
        """Type checks only (the rendered userconfig.xml is validated by appliance.config)."""
        if not isinstance(data, Mapping):
            raise ConsoleError(400, "bad_request", "settings must be an object")
        errors = []
        vip = data.get("vip")
        if vip is not None and not isinstance(vip, str):
            errors.append(field_error("settings", None, "vip", "must be an IPv4 address or null"))
        elif vip is not None and vip.strip():
            try:
                vip = str(IPv4Address(vip.strip()))
            except ValueError:
                errors.append(field_error("settings", None, "vip",
                                          f"{vip!r} is not an IPv4 address"))
        else:
            vip = None
        dirs = data.get("replicated_dirs", [])
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            errors.append(field_error("settings", None, "replicated_dirs",
                                      "must be a list of absolute paths"))
            dirs = []
        numbers = {}
        for key in ("pulse_ms", "timeout_ms"):
            value = data.get(key, getattr(cls, key))
            if not isinstance(value, int) or isinstance(value, bool):
                errors.append(field_error("settings", None, key, "must be an integer"))
                value = getattr(cls, key)
            numbers[key] = value
        if errors:
            raise ConsoleError(400, "invalid_settings", "the settings are invalid", errors)
        return cls(vip, tuple(d.strip() for d in dirs if d.strip()), **numbers)

    @classmethod
    def from_service(cls, service: ServiceConfig) -> Settings:
        vips = [str(a.addr) for iface in service.vips for a in iface.addrs]
        dirs = tuple(str(d.path) for d in service.rfs.dirs) if service.rfs else ()
        return cls(vips[0] if vips else None, dirs, service.heart.pulse_ms,
                   service.heart.timeout_ms)


def template_userconfig(s: Settings) -> str:
    """The reference's mirror.safe userconfig.xml with the simple form's values filled in. The
    heartbeat network is the console's one lan, "default" (cluster.xml as PUT /nodes writes it)."""
    vip = ""
    if s.vip:
        vip = f"""      <!-- Virtual IP Configuration -->
      <vip>
         <interface_list>
            <interface check="on" arpreroute="on">
               <real_interface>
                  <virtual_addr addr={quoteattr(s.vip)} where="one_side_alias"/>
               </real_interface>
            </interface>
         </interface_list>
      </vip>
"""
    rfs = ""
    if s.replicated_dirs:
        dirs = "".join(f"         <replicated dir={quoteattr(d)} mode=\"read_only\"/>\n"
                       for d in s.replicated_dirs)
        rfs = f"""      <!-- File Replication Configuration -->
      <rfs mountover="off" async="second" acl="off" nbrei="3">
{dirs}      </rfs>
"""
    return f"""<!DOCTYPE safe>
<safe>
   <service mode="mirror" defaultprim="alone" maxloop="3" loop_interval="24" failover="on">
      <!-- Server Configuration: the nodes and their addresses are in cluster.xml -->
      <heart pulse="{s.pulse_ms}" timeout="{s.timeout_ms}">
         <heartbeat name="default" ident="flow"/>
      </heart>
{vip}      <!-- Software Error Detection Configuration: add <proc name=... atleast="1"
           action="restart" class="prim"/> for each process of the application -->
      <errd polltimer="10">
      </errd>
{rfs}      <!-- User scripts activation -->
      <user nicestoptimeout="300" forcestoptimeout="300" logging="userlog"/>
   </service>
</safe>
"""


TEMPLATE_START_PRIM = """#!/bin/sh
# Script called on the primary server for starting application

# For logging into the module log use:
# $SAFE/safekit printi | printe "message"

# stdout goes into Application log
echo "Running start_prim $*"

res=0

# Fill with your application start call

if [ $res -ne 0 ] ; then
  $SAFE/safekit printe "start_prim failed"

  # uncomment to stop the module when critical
  # $SAFE/safekit stop -i "start_prim"
fi
"""

TEMPLATE_STOP_PRIM = """#!/bin/sh
# Script called on the primary server for stopping application

# 2 stop modes:
# - graceful stop: call standard application stop
# - force stop ($1=force): kill application's processes

# For logging into the module log use:
# $SAFE/safekit printi | printe "message"

# stdout goes into Application log
echo "Running stop_prim $*"

res=0

# default: no action on forcestop
[ "$1" = "force" ] && exit 0

# Fill with your application stop call

[ $res -ne 0 ] && $SAFE/safekit printe "stop_prim failed"
exit 0
"""


def template_files(settings: Settings = Settings()) -> dict[str, str]:
    return {USERCONFIG: template_userconfig(settings), "bin/start_prim": TEMPLATE_START_PRIM,
            "bin/stop_prim": TEMPLATE_STOP_PRIM}


# ---------------------------------------------------------------------------------------------
# The local node


class LocalNode:
    """This node, for one console. `home` is its MIRRORHA_HOME."""

    def __init__(self, home: Path, name: str | None = None) -> None:
        self.home = home
        self.name = name or node_name()
        # One deploy at a time here (this console's, or the peer's through the peer API):
        # two would race on the files and both restart the daemon.
        self._deploying = threading.Lock()

    def paths(self, module: str) -> Paths:
        """A known module's paths: the template's name, or a module deployed here."""
        check_module(module)
        paths = Paths(self.home, module)
        if module != TEMPLATE and not paths.module_dir.is_dir():
            raise ConsoleError(404, "not_found", f"no module {module!r} on {self.name}")
        return paths

    # -- identity ------------------------------------------------------------------------

    def cluster_configured(self) -> bool:
        p = Paths(self.home)
        return p.cluster_xml.is_file() and p.cluster_key.is_file()

    def hello(self) -> dict[str, Any]:
        return {"node": self.name, "configured": self.cluster_configured(),
                "version": version()}

    def module_configured(self, module: str) -> bool:
        return self.cluster_configured() and self.paths(module).userconfig.is_file()

    def modules(self) -> list[dict[str, Any]]:
        names = {TEMPLATE}
        if self.home.is_dir():
            names |= {d.name for d in self.home.iterdir()
                      if MODULE_RE.fullmatch(d.name) and (d / USERCONFIG).is_file()}
        return [{"name": n, "configured": self.module_configured(n)} for n in sorted(names)]

    # -- module files --------------------------------------------------------------------

    def read_files(self, module: str) -> dict[str, str]:
        """The deployed files, the template's for those not deployed yet."""
        paths = self.paths(module)
        files = template_files()
        for key in MODULE_FILES:
            path = paths.module_dir / key
            # Through a linked directory: not the module's (validate says so)
            if path.is_file() and not path.is_symlink() and cli.confined(paths, path):
                files[key] = path.read_text(errors="replace")
        return files

    def read_config(self, module: str) -> dict[str, Any]:
        files = self.read_files(module)
        try:
            settings = Settings.from_service(parse_userconfig(files[USERCONFIG],
                                                              Path(USERCONFIG)))
            settings_json: dict[str, Any] | None = settings.to_json()
        except ConfigError:
            settings_json = None  # an advanced edit the simple form cannot show
        return {"files": files, "settings": settings_json}

    def complete_files(self, module: str, body: Mapping[str, Any]) -> dict[str, str]:
        """The files a validate/deploy request means: `{"files": {...}}` over the current ones,
        or `{"settings": {...}}`: the template's userconfig.xml filled in, current scripts."""
        current = self.read_files(module)
        if "settings" in body:
            current[USERCONFIG] = template_userconfig(Settings.from_json(body["settings"]))
            return current
        files = body.get("files")
        if not isinstance(files, Mapping) or not files:
            raise ConsoleError(400, "bad_request",
                               'send {"settings": {...}} or {"files": {...}}')
        unknown = [k for k in files if k not in MODULE_FILES]
        bad = [k for k in files if k in MODULE_FILES and not isinstance(files[k], str)]
        if unknown or bad:
            raise ConsoleError(400, "bad_request", "unexpected files", [
                field_error(k, None, "files", f"not a module file (allowed: "
                            f"{', '.join(MODULE_FILES)})") for k in unknown] + [
                field_error(k, None, "files", "must be text") for k in bad])
        return {**current, **{k: str(v) for k, v in files.items()}}

    def validate(self, module: str, files: Mapping[str, str]) -> list[dict[str, Any]]:
        """Field errors for these files on this node (empty: they can be deployed here)."""
        paths = self.paths(module)
        errors: list[dict[str, Any]] = [
            field_error(key, None, "path", f"{(paths.module_dir / key).parent} is a symbolic "
                        f"link on {self.name}: the console writes only inside the module")
            for key in MODULE_FILES if not cli.confined(paths, paths.module_dir / key)]
        for key in MODULE_FILES:
            text = files.get(key, "")
            if len(text.encode()) > MAX_FILE_BYTES:
                errors.append(field_error(key, None, "size", f"larger than {MAX_FILE_BYTES} "
                                          "bytes"))
        for key in SCRIPTS:
            text = files.get(key, "")
            if not text.strip():
                errors.append(field_error(key, None, "content", "the script is empty"))
            elif not text.startswith("#!"):
                errors.append(field_error(key, 1, "content",
                                          "a script must start with #! (e.g. #!/bin/sh)"))
        try:
            service = self._parse(paths, files.get(USERCONFIG, ""))
        except ConfigError as e:
            errors.append(field_error(USERCONFIG, e.line, e.field, e.message))
            return errors
        errors += self._check_dirs(service)
        errors += self._check_vips(service)
        return errors

    def _parse(self, paths: Paths, text: str) -> ServiceConfig:
        source = Path(USERCONFIG)
        if paths.cluster_xml.is_file():
            return parse_node_config(load_cluster(paths.cluster_xml), text, source).service
        return parse_userconfig(text, source)

    def _check_dirs(self, service: ServiceConfig) -> list[dict[str, Any]]:
        errors = []
        for d in service.rfs.dirs if service.rfs else ():
            path = Path(str(d.path))
            where = f"on {self.name}"
            if not path.is_dir():
                errors.append(field_error(USERCONFIG, None, "rfs/replicated@dir",
                                          f"{path} does not exist {where} (create it first)"))
            elif os.path.ismount(path) and not _our_fuse_mount(path):
                errors.append(field_error(
                    USERCONFIG, None, "rfs/replicated@dir",
                    f"{path} is a mount point {where}: replicate a directory inside it"))
        return errors

    def _check_vips(self, service: ServiceConfig) -> list[dict[str, Any]]:
        from appliance.vip import VipError, VirtualIp
        errors = []
        for iface in service.vips:
            for va in iface.addrs:
                try:
                    VirtualIp(va.addr, iface.name, iface.arpreroute, lambda _: None
                              ).resolve_interface()
                except (VipError, OSError) as e:
                    errors.append(field_error(USERCONFIG, None, "vip/interface_list/interface",
                                              f"{e} (on {self.name})"))
        return errors

    def check(self, module: str, files: Mapping[str, str]) -> dict[str, Any]:
        """Validation errors here, and (if none) why a deploy would be refused now."""
        errors = self.validate(module, files)
        return {"errors": errors, "blocker": None if errors else
                self.deploy_blocker(module, files)}

    def deploy_blocker(self, module: str, files: Mapping[str, str]) -> str | None:
        """Why these files cannot be deployed now (None: they can). A new userconfig.xml
        needs the module stopped; scripts may be replaced at any time."""
        paths = self.paths(module)
        if not self.cluster_configured():
            return f"{self.name} has no cluster yet: add both nodes first"
        if not self._userconfig_changes(paths, files):
            return None
        state = self.daemon_state(module)
        if state is not None and state["state"] != "STOP":
            return (f"the module is {state['state']} on {self.name}: stop it on both nodes "
                    "before changing userconfig.xml (scripts alone may be redeployed any time)")
        return None

    @staticmethod
    def _userconfig_changes(paths: Paths, files: Mapping[str, str]) -> bool:
        try:
            return paths.userconfig.read_text() != files[USERCONFIG]
        except FileNotFoundError:
            return True

    def deploy(self, module: str, files: Mapping[str, str]) -> str:
        """Validate, write atomically, then make the daemon run with the new configuration (in
        STOP: the operator starts the module). Returns what was done."""
        if not self._deploying.acquire(blocking=False):
            raise ConsoleError(409, "busy", f"{self.name}: another deployment of the module "
                               "is under way; try again when it has finished")
        try:
            return self._deploy(module, files)
        finally:
            self._deploying.release()

    def _deploy(self, module: str, files: Mapping[str, str]) -> str:
        errors = self.validate(module, files)
        if errors:
            raise ConsoleError(400, "invalid_config", f"invalid configuration on {self.name}",
                               errors)
        blocker = self.deploy_blocker(module, files)
        if blocker:
            raise ConsoleError(409, "module_running", blocker)
        paths = self.paths(module)
        config_changed = self._userconfig_changes(paths, files)
        try:
            _replace_files({paths.module_dir / key: (files[key], 0o755 if key in SCRIPTS
                                                     else 0o644) for key in MODULE_FILES})
            paths.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConsoleError(500, "deploy_failed", f"{self.name}: cannot write the module's "
                               f"files: {e}") from None
        state = self.daemon_state(module)
        if state is None:
            self.start_daemon(module)
            return "configured; daemon started (module stopped)"
        if config_changed:
            self.restart_daemon(module, state)
            return "configured; daemon restarted with the new configuration (module stopped)"
        return "configured (scripts replaced)"

    # -- daemon --------------------------------------------------------------------------

    def daemon_state(self, module: str) -> dict[str, Any] | None:
        """The daemon's status, None if it is not running."""
        try:
            return control.get_state(self.paths(module).control_socket)
        except control.DaemonUnreachable:
            return None

    def state(self, module: str) -> dict[str, Any]:
        """This node in GET /modules/<m>/state."""
        try:
            st = self.daemon_state(module)
        except MirrorhaError as e:
            return {**_NO_STATE, "reachable": True, "daemon": "running", "error": str(e)}
        if st is None:
            configured = self.module_configured(module)
            return {**_NO_STATE, "reachable": True,
                    "state": "STOP" if configured else None,
                    "daemon": "not running" if configured else "not configured"}
        return {"reachable": True, **summarize_state(st), "daemon": "running", "error": None}

    def command(self, module: str, name: str) -> None:
        try:
            command = Command(name)
        except ValueError:
            raise ConsoleError(404, "not_found", f"no command {name!r} (commands: "
                               f"{', '.join(c.value for c in Command)})") from None
        paths = self.paths(module)
        if self.daemon_state(module) is None:
            self.start_daemon(module)
        try:
            control.send_command(paths.control_socket, command, "console")
        except CommandRefused as e:
            raise ConsoleError(409, "refused", f"{self.name}: {e}") from None

    def start_daemon(self, module: str) -> None:
        """Start the module's daemon (in STOP) and wait until it answers its control socket."""
        paths = self.paths(module)
        if not self.module_configured(module):
            raise ConsoleError(409, "not_configured",
                               f"the module {module!r} is not configured on {self.name}")
        if _under_systemd() and module == TEMPLATE:
            self._run(["systemctl", "start", "mirrorha"], SYSTEMCTL_S)
        else:
            # Without systemd (the lab, a container): detached into its own session so it
            # outlives this console, output kept beside the module's logs.
            paths.log_dir.mkdir(parents=True, exist_ok=True)
            out = paths.log_dir / "daemon.out"
            with open(out, "ab") as log:
                log.write(f"--- {time.strftime('%F %T')} started by the console\n".encode())
                log.flush()
                env = {**os.environ, "MIRRORHA_HOME": str(self.home), "MIRRORHA_NODE": self.name}
                self._run(["setsid", "-f", *mirrorha_argv(), "-m", module, "daemon"], 30,
                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)

        def answers() -> bool:
            return self.daemon_state(module) is not None
        try:
            wait_until(answers, DAEMON_START_S, f"the daemon of {module} to answer",
                       interval=0.1, error=TimeoutError)
        except TimeoutError:
            tail = _tail_text(paths.log_dir / "daemon.out", 3)
            raise ConsoleError(500, "daemon_failed", f"the daemon did not start on "
                               f"{self.name}: {tail or 'no output'}") from None

    def _run(self, argv: list[str], timeout: float, **kw: Any) -> None:
        """A command starting or restarting the daemon; its failure is this node's error."""
        try:
            subprocess.run(argv, check=True, timeout=timeout, **kw)
        except (OSError, subprocess.SubprocessError) as e:
            raise ConsoleError(500, "daemon_failed", f"{self.name}: {argv[0]} {argv[1]} "
                               f"failed: {e}") from None

    def restart_daemon(self, module: str, state: dict[str, Any]) -> None:
        if _under_systemd() and module == TEMPLATE:
            self._run(["systemctl", "restart", "mirrorha"], 2 * SYSTEMCTL_S)
        else:
            pid = int(state["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda: self.daemon_state(module) is None, DAEMON_STOP_S,
                           f"the daemon of {module} to stop", interval=0.1, error=TimeoutError)
            except TimeoutError as e:
                raise ConsoleError(500, "daemon_failed", f"{self.name}: {e}") from None
        self.start_daemon(module)

    # -- logs, snapshot, boot ------------------------------------------------------------

    def logs(self, module: str, kind: str, lines: int = 200, offset: int | None = None,
             wait_s: float = FOLLOW_WAIT_S) -> dict[str, Any]:
        """The last `lines` lines, or (offset given) those appended after `offset`, waiting up
        to wait_s for some. Offsets are byte positions after a complete line."""
        if kind not in LOG_FILES:
            raise ConsoleError(404, "not_found", f"no log {kind!r} (logs: module, application)")
        path = self._log_path(self.paths(module), kind)
        lines = max(1, min(int(lines), MAX_LOG_LINES))
        if offset is None:
            start, data = _read_log(path) or (0, b"")
            return _complete_lines(start, data, lines)
        offset = max(0, int(offset))
        deadline = time.monotonic() + max(0.0, min(wait_s, FOLLOW_WAIT_S))
        while True:
            # None: the log was truncated or rotated below the offset: start over
            start, data = _read_log(path, offset) or _read_log(path) or (0, b"")
            answer = _complete_lines(start, data, MAX_LOG_LINES)
            if answer["lines"] or answer["offset"] != offset or time.monotonic() >= deadline:
                return answer
            time.sleep(0.2)  # polling a growing file: there is nothing to wait on

    @staticmethod
    def _log_path(paths: Paths, kind: str) -> Path:
        """The log file, refusing a log directory that is (or leads through) a symlink."""
        path = paths.log_dir / LOG_FILES[kind]
        if not cli.confined(paths, path):
            raise ConsoleError(403, "forbidden", f"{paths.log_dir} is (or is reached through) "
                               "a symbolic link: refusing to read logs through it")
        return path

    def snapshot(self, module: str) -> bytes:
        out = io.BytesIO()
        cli.write_snapshot(self.paths(module), out)
        return out.getvalue()

    def boot(self, module: str) -> dict[str, Any]:
        self.paths(module)
        return {"on": cli.boot_enabled()}

    def set_boot(self, module: str, on: bool) -> dict[str, Any]:
        message = cli.set_boot(self.paths(module), on)
        return {"on": cli.boot_enabled(), "message": message}

    # -- freshness -----------------------------------------------------------------------

    def freshness(self, module: str) -> dict[str, Any]:
        """What the first-start recommendation compares: the data generation this node
        remembers, its last role, and what its replicated directories hold."""
        paths = self.paths(module)
        try:
            memory = Memory.from_json(_json_file(paths.state_file))
        except FileNotFoundError:
            memory = Memory()
        except (ValueError, KeyError, TypeError) as e:
            raise ConsoleError(500, "bad_state", f"{paths.state_file}: unreadable ({e})"
                               ) from None
        files = size = 0
        newest = 0.0
        truncated = False
        dirs: tuple[str, ...] = ()
        if paths.userconfig.is_file():
            try:
                dirs = Settings.from_service(self._parse(paths, paths.userconfig.read_text())
                                             ).replicated_dirs
            except ConfigError:
                dirs = ()
        for d in dirs:
            for entry in _walk(Path(d)):
                files += 1
                size += entry.st_size
                newest = max(newest, entry.st_mtime)
                if files >= FRESHNESS_MAX_ENTRIES:
                    truncated = True
                    break
        return {"generation": [memory.gen.counter, memory.gen.writer],
                "wrote_alone": memory.wrote_alone, "last_role": memory.last_role or None,
                "files": files, "bytes": size, "newest_mtime": newest or None,
                "truncated": truncated}


_NO_STATE: dict[str, Any] = {
    "state": None, "readiness": "not_ready", "peer_state": None, "in_sync": False,
    "resync_progress": None, "vip": [], "generation": None, "split_brain": False, "busy": None,
}


def summarize_state(st: Mapping[str, Any]) -> dict[str, Any]:
    """The daemon's `state --json` reduced to what the console shows."""
    state = st["state"]
    in_sync = bool(st.get("in_sync"))
    if st.get("busy") or state == "WAIT" or (state == "SECOND" and not in_sync):
        readiness = "transient"
    elif state in ("PRIM", "ALONE", "SECOND"):
        readiness = "ready"
    else:
        readiness = "not_ready"
    # The daemon reports no byte count of a reintegration in progress yet: 100 once in sync,
    # 0 while a SECOND is being brought level, unknown otherwise.
    progress = None
    if state == "SECOND":
        progress = 100 if in_sync else 0
    return {"state": state, "readiness": readiness, "peer_state": st.get("peer_state"),
            "in_sync": in_sync, "resync_progress": progress, "vip": st.get("vip", []),
            "generation": st.get("generation"), "split_brain": bool(st.get("split_brain")),
            "busy": st.get("busy")}


def recommend(order: list[str], fresh: Mapping[str, Mapping[str, Any] | None]
              ) -> tuple[str | None, str]:
    """Which node to start first (prim) and why: the newer data generation; without history
    the node whose replicated directories hold data, then the newest modification; ties go to
    the first node of cluster.xml."""
    known = [n for n in order if fresh.get(n)]
    missing = [n for n in order if not fresh.get(n)]
    if not known:
        return None, "no node could be asked"
    if missing:
        return known[0], (f"{', '.join(missing)} could not be asked; {known[0]} is the only "
                          "node whose data is known")
    a, b = known[0], known[1]
    fa, fb = fresh[a], fresh[b]
    assert fa is not None and fb is not None
    ga, gb = fa["generation"][0], fb["generation"][0]
    if ga != gb:
        best = a if ga > gb else b
        return best, (f"{best} holds the newer data generation "
                      f"({max(ga, gb)} against {min(ga, gb)})")
    if bool(fa["files"]) != bool(fb["files"]):
        best = a if fa["files"] else b
        return best, (f"same data generation; only {best} has data in its replicated "
                      f"directories ({fresh[best]['files']} files)")  # type: ignore[index]
    ma, mb = fa["newest_mtime"] or 0, fb["newest_mtime"] or 0
    if ma != mb and (fa["files"] or fb["files"]):
        best = a if ma > mb else b
        return best, f"same data generation; {best} holds the most recently modified files"
    return a, f"the data of both nodes looks the same; {a} is the first node of the cluster"


# ---------------------------------------------------------------------------------------------
# helpers


def mirrorha_argv() -> list[str]:
    """The `mirrorha` command of this installation (the one beside our Python, in a venv)."""
    exe = Path(sys.executable).parent / "mirrorha"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "appliance.cli"]


def _under_systemd() -> bool:
    """systemd runs this machine (its PID 1): the daemon is its unit. Elsewhere (the lab's
    node containers, whose PID 1 is labinit) the console starts it itself."""
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def _our_fuse_mount(path: Path) -> bool:
    """The directory is mounted by a mirrorha daemon already (the module's own over-mount)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        if fields[4].replace("\\040", " ") == str(path) and fields[sep + 1] == "fuse.mirrorha":
            return True
    return False


def _replace_files(files: Mapping[Path, tuple[str, int]]) -> None:
    """Atomic replace of each file (a reader, the daemon or a script starting, sees the old or
    the new one), all written first: a full disk or an I/O error while writing leaves every
    file as it was, not the first one new and the others old."""
    staged = []
    try:
        for path, (text, mode) in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((stage_file(path, text.encode(), mode), path))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


LOG_READ_BYTES = 8 << 20  # MAX_LOG_LINES lines fit in it: a huge log is never read whole


def _read_log(path: Path, offset: int = 0) -> tuple[int, bytes] | None:
    """(where the bytes start, the log's bytes from there): from `offset`, or from the first
    line start within the log's last LOG_READ_BYTES when that is further; an offset inside a
    line starts at the next line. (0, b"") if there is no log yet; None if `offset` is past its
    end. Never through a symlink: a log file replaced by a link to /etc/shadow stays unread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return (0, b"") if offset == 0 else None
    except OSError as e:
        raise ConsoleError(403, "forbidden", f"{path.name}: not a plain file ({e.strerror})"
                           ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConsoleError(403, "forbidden", f"{path.name}: not a plain file")
        if offset > st.st_size:
            return None
        start = max(offset, st.st_size - LOG_READ_BYTES)
        f.seek(max(0, start - 1))
        if start > 0 and f.read(1) != b"\n":
            f.readline()  # inside a line: from the next one
        start = f.tell()
        return start, f.read(st.st_size - start)


def _complete_lines(start: int, data: bytes, lines: int) -> dict[str, Any]:
    """The last `lines` complete lines of data read at `start`, and the offset after them."""
    end = data.rfind(b"\n") + 1
    text = data[:end].decode(errors="replace").splitlines()
    return {"lines": text[-lines:], "offset": start + end}


def _tail_text(path: Path, lines: int) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _json_file(path: Path) -> Any:
    import json
    return json.loads(path.read_text())


def _walk(root: Path) -> Iterator[os.stat_result]:
    """lstat of every regular file below root, never following a symlink."""
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        yield entry.stat(follow_symlinks=False)
        except OSError:
            continue
