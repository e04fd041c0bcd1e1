"""Parse and validate a node's two configuration files into frozen dataclasses.

- ``userconfig.xml``: the module configuration, in the format of SafeKit's mirror.safe (a
  superset: ``<splitbrain>``, ``autoswap``, ``heart@port``, ``interface@name``).
- ``cluster.xml``: the two nodes and their address on each network ("lan").

Every value is checked, unknown elements and attributes are errors (a typo must not silently
fall back to a default), and every error is a :class:`ConfigError` naming the file, the line and
an XPath-ish field such as ``heart@pulse``.

Parsing goes through defusedxml so that entity-expansion ("billion laughs") and external-entity
tricks are refused. The stock ElementTree does not keep line numbers, so a small parser target
builds our own element tree and records the expat line of each start tag.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath
from typing import Any
from xml.parsers import expat

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser, ParseError

from appliance.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Data model of userconfig.xml


@dataclass(frozen=True)
class HeartbeatNet:
    name: str  # a lan of cluster.xml
    ident: str | None  # "flow" marks the network that also carries replication


@dataclass(frozen=True)
class HeartConfig:
    pulse_ms: int
    timeout_ms: int
    port: int
    networks: tuple[HeartbeatNet, ...]

    @property
    def flow_network(self) -> str:
        """The network carrying replication: the one marked ident="flow", else the first."""
        for net in self.networks:
            if net.ident == FLOW_IDENT:
                return net.name
        return self.networks[0].name


@dataclass(frozen=True)
class VirtualAddr:
    addr: IPv4Address
    where: str


@dataclass(frozen=True)
class VipInterface:
    check: bool
    arpreroute: bool
    name: str | None  # None: the interface whose subnet contains the VIP
    addrs: tuple[VirtualAddr, ...]


@dataclass(frozen=True)
class ProcCheck:
    name: str
    atleast: int
    action: str  # "restart" | "stop"
    klass: str  # "prim" | "both"


@dataclass(frozen=True)
class ErrdConfig:
    polltimer_s: float
    procs: tuple[ProcCheck, ...]


@dataclass(frozen=True)
class ReplicatedDir:
    path: PurePosixPath
    mode: str


@dataclass(frozen=True)
class RfsConfig:
    mountover: bool
    async_mode: str  # "second" | "none"
    acl: bool
    nbrei: int
    dirs: tuple[ReplicatedDir, ...]


@dataclass(frozen=True)
class SplitBrainConfig:
    witness: IPv4Address


@dataclass(frozen=True)
class UserScripts:
    nicestoptimeout_s: int
    forcestoptimeout_s: int
    logging: str  # "userlog" | "none"


@dataclass(frozen=True)
class ServiceConfig:
    source: Path
    mode: str
    defaultprim: str  # "alone" or a node name
    maxloop: int
    loop_interval_h: float
    failover: bool
    autoswap: bool
    heart: HeartConfig
    vips: tuple[VipInterface, ...]
    errd: ErrdConfig | None
    rfs: RfsConfig | None
    splitbrain: SplitBrainConfig | None
    user: UserScripts
    warnings: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Data model of cluster.xml


class FrozenMap(Mapping[str, IPv4Address]):
    """A read-only, hashable mapping, so that a frozen dataclass holding it stays hashable."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, IPv4Address]]) -> None:
        self._items: dict[str, IPv4Address] = dict(items)

    def __getitem__(self, key: str) -> IPv4Address:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


@dataclass(frozen=True)
class Node:
    name: str
    addrs: Mapping[str, IPv4Address]  # lan name -> address of this node on that lan

    def addr(self, lan: str) -> IPv4Address:
        try:
            return self.addrs[lan]
        except KeyError:
            raise KeyError(f"node {self.name!r} has no address on lan {lan!r}") from None


@dataclass(frozen=True)
class ClusterConfig:
    source: Path
    lans: tuple[str, ...]
    nodes: tuple[Node, Node]
    warnings: tuple[str, ...] = ()

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(self.source, None, "node", f"unknown node {name!r} (known: {known})")

    def peer_of(self, name: str) -> Node:
        me = self.node(name)
        return self.nodes[1] if me is self.nodes[0] else self.nodes[0]


@dataclass(frozen=True)
class NodeConfig:
    cluster: ClusterConfig
    service: ServiceConfig

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.cluster.warnings + self.service.warnings


# --------------------------------------------------------------------------------------------
# Vocabulary

FLOW_IDENT = "flow"
ALONE = "alone"
ONE_SIDE_ALIAS = "one_side_alias"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
NAME_RULE = "1 to 32 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
COMM_MAX = 15  # Linux keeps at most 15 characters of a process name (TASK_COMM_LEN - 1)
IFNAME_MAX = 15  # Linux IFNAMSIZ - 1
PLACEHOLDERS = {
    "VIRTUAL_TO_BE_DEFINED": "the virtual IPv4 address of the service",
    "PROCESS_NAME": "the name of the process to monitor",
}
_INT_RE = re.compile(r"[0-9]+")
_DECIMAL_RE = re.compile(r"[0-9]+(\.[0-9]+)?|\.[0-9]+")
# A curly-quoted attribute value, as left behind by copying the reference from a web page.
_CURLY_ATTR_RE = re.compile(r"(\s[^\s=<>\"']+\s*=\s*)[“”]([^“”\"<>\n]*)[“”]")
_OPAQUE_RE = re.compile(r"(<!--.*?-->|<!\[CDATA\[.*?\]\]>)", re.DOTALL)
_REQUIRED: Any = object()


# --------------------------------------------------------------------------------------------
# XML reading with line numbers


@dataclass
class _Elem:
    tag: str
    attrib: dict[str, str]
    line: int
    path: str  # XPath-ish name used in errors, e.g. "vip/interface_list/interface"
    child_base: str  # prefix of the children's path ("" at the levels that are left out)
    children: list[_Elem] = field(default_factory=list)


class _LineTarget:
    """ElementTree parser target building :class:`_Elem` nodes with their line numbers.

    ``strip`` is how many outer levels are left out of field names: userconfig fields read
    ``heart@pulse``, not ``safe/service/heart@pulse``.
    """

    def __init__(self, source: Path, strip: int) -> None:
        self.source = source
        self.strip = strip
        self.line: Callable[[], int] = lambda: 1
        self.stack: list[_Elem] = []
        self.root: _Elem | None = None

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        depth = len(self.stack)
        path = self.stack[-1].child_base + tag if self.stack else tag
        child_base = path + "/" if depth + 1 > self.strip else ""
        elem = _Elem(tag, dict(attrib), self.line(), path, child_base)
        if self.stack:
            self.stack[-1].children.append(elem)
        else:
            self.root = elem
        self.stack.append(elem)

    def end(self, tag: str) -> None:
        self.stack.pop()

    def data(self, text: str) -> None:
        stripped = text.lstrip()
        if not stripped:
            return
        # Buffered text is delivered when the next markup starts, so the parser is at the end
        # of the text: count back to the line where the stray text begins.
        line = self.line() - stripped.count("\n")
        path = self.stack[-1].path if self.stack else "xml"
        raise ConfigError(
            self.source, line, path, f"unexpected text {stripped.strip()[:40]!r} (only elements)"
        )

    def comment(self, text: str) -> None:
        pass  # comments are welcome anywhere

    def close(self) -> _Elem | None:
        return self.root


def _normalise_curly_quotes(text: str, source: Path) -> tuple[str, list[str]]:
    """Read typographic quotes delimiting attribute values as plain quotes.

    Each replacement is one character for one character, so line numbers stay right. Comments
    and CDATA are left alone.
    """
    out: list[str] = []
    lines: set[int] = set()
    offset = 0
    for i, chunk in enumerate(_OPAQUE_RE.split(text)):
        if i % 2 == 0:
            for m in _CURLY_ATTR_RE.finditer(chunk):
                lines.add(text.count("\n", 0, offset + m.start(2)) + 1)
            chunk = _CURLY_ATTR_RE.sub(r'\1"\2"', chunk)
        out.append(chunk)
        offset += len(chunk)
    warnings = [
        f"{source}:{line}: typographic quotes around attribute values were read as plain quotes"
        for line in sorted(lines)
    ]
    return "".join(out), warnings


def _parse_xml(text: str, source: Path, root_tag: str, strip: int) -> tuple[_Elem, list[str]]:
    """Parse ``text`` safely; return the root element and the warnings."""
    text, warnings = _normalise_curly_quotes(text, source)
    target = _LineTarget(source, strip)
    parser = DefusedXMLParser(target=target)
    expat_parser = parser.parser
    target.line = lambda: expat_parser.CurrentLineNumber
    doctype = _DoctypeGuard(source, root_tag, target.line)
    expat_parser.StartDoctypeDeclHandler = doctype.start
    expat_parser.EndDoctypeDeclHandler = doctype.end
    try:
        parser.feed(text)
        root = parser.close()
    except ParseError as e:
        raise _malformed(source, text, e) from None
    except DefusedXmlException as e:
        raise ConfigError(
            source,
            expat_parser.CurrentLineNumber,
            "DOCTYPE",
            f"refused by the safe XML parser: {e} (entity declarations and external "
            "references are not allowed in a configuration file)",
        ) from None
    assert root is not None  # expat reports a document without an element as malformed
    if root.tag != root_tag:
        raise ConfigError(
            source, root.line, root.path, f"the root element must be <{root_tag}>"
        )
    return root, warnings


class _DoctypeGuard:
    """Allow ``<!DOCTYPE root>`` as in the reference, nothing more.

    An internal subset could supply attribute defaults (ATTLIST) that nobody sees in the file;
    entity declarations in it are refused by defusedxml before we get to the end of it.
    """

    def __init__(self, source: Path, root_tag: str, line: Callable[[], int]) -> None:
        self.source = source
        self.root_tag = root_tag
        self.line = line
        self.start_line = 0
        self.internal_subset = False

    def start(self, name: str, sysid: str | None, pubid: str | None, internal: int) -> None:
        self.start_line = self.line()
        if name != self.root_tag:
            message = f"must name <{self.root_tag}>, not {name!r}"
            raise ConfigError(self.source, self.start_line, "DOCTYPE", message)
        if sysid is not None or pubid is not None:
            raise ConfigError(
                self.source, self.start_line, "DOCTYPE", "external DTDs are not allowed"
            )
        self.internal_subset = bool(internal)

    def end(self) -> None:
        if self.internal_subset:
            raise ConfigError(
                self.source,
                self.start_line,
                "DOCTYPE",
                "an internal DTD subset ([...]) is not allowed; write just <!DOCTYPE "
                f"{self.root_tag}>",
            )


def _malformed(source: Path, text: str, e: ParseError) -> ConfigError:
    line, column = e.position
    message = f"malformed XML: {expat.ErrorString(e.code)} (column {column + 1})"
    # A stray curly quote usually breaks the parse a few lines further down: point back at it.
    before = text.splitlines()[:line]
    curly = [n for n, content in enumerate(before, 1) if re.search("[“”‘’]", content)]
    if curly:
        message += (
            f"; note the typographic quote on line {curly[-1]}: attribute values must be "
            'delimited by plain " quotes'
        )
    return ConfigError(source, line, "xml", message)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, None, "file", f"cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(path, line, "file", "not valid UTF-8 text") from None


# --------------------------------------------------------------------------------------------
# Value checks: each raises a ConfigError naming the element's line and the attribute


class _Checker:
    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, elem: _Elem, attr: str | None, message: str) -> ConfigError:
        name = f"{elem.path}@{attr}" if attr else elem.path
        return ConfigError(self.source, elem.line, name, message)

    # -- structure

    def attrs(self, elem: _Elem, required: Iterable[str], optional: Iterable[str]) -> None:
        required, optional = set(required), set(optional)
        for name in elem.attrib:
            if name not in required | optional:
                allowed = ", ".join(sorted(required | optional)) or "none"
                raise self.fail(elem, name, f"unknown attribute (allowed: {allowed})")
        for name in sorted(required):
            if name not in elem.attrib:
                raise self.fail(elem, name, "required attribute is missing")

    def leaf(self, elem: _Elem, required: Iterable[str], optional: Iterable[str]) -> None:
        """An element with attributes only."""
        self.attrs(elem, required, optional)
        self.children(elem, {})

    def children(
        self, elem: _Elem, allowed: Mapping[str, tuple[int, int | None]]
    ) -> dict[str, list[_Elem]]:
        """Group children by tag, checking names and counts (min, max or None)."""
        found: dict[str, list[_Elem]] = {tag: [] for tag in allowed}
        for child in elem.children:
            if child.tag not in allowed:
                names = ", ".join(f"<{t}>" for t in allowed) or "none"
                raise self.fail(child, None, f"unknown element <{child.tag}> (allowed: {names})")
            same = found[child.tag]
            limit = allowed[child.tag][1]
            if limit is not None and len(same) >= limit:
                raise self.fail(child, None, f"only {limit} <{child.tag}> allowed here (one is on "
                                             f"line {same[0].line})")
            same.append(child)
        for tag, (least, most) in allowed.items():
            if len(found[tag]) < least:
                what = "a" if least == most == 1 else f"at least {least}"
                raise ConfigError(
                    self.source, elem.line, elem.child_base + tag, f"{what} <{tag}> is required"
                )
        return found

    # -- values

    def raw(self, elem: _Elem, attr: str, default: str = _REQUIRED) -> str:
        value = elem.attrib.get(attr)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(elem, attr, "required attribute is missing")
            return default
        for placeholder, meaning in PLACEHOLDERS.items():
            if placeholder in value:
                raise self.fail(
                    elem, attr, f"placeholder not filled in: replace {placeholder} by {meaning}"
                )
        return value

    def integer(self, elem: _Elem, attr: str, default: int | None, lo: int, hi: int | None,
                unit: str = "") -> int:
        value = self.raw(elem, attr, _REQUIRED if default is None else str(default))
        if not _INT_RE.fullmatch(value):
            raise self.fail(elem, attr, f"{value!r} is not a whole number{_range(lo, hi, unit)}")
        number = int(value)
        if number < lo or (hi is not None and number > hi):
            raise self.fail(elem, attr, f"{number} is out of range{_range(lo, hi, unit)}")
        return number

    def decimal(self, elem: _Elem, attr: str, default: str, lo: float, hi: float,
                unit: str, lo_open: bool = False) -> float:
        value = self.raw(elem, attr, default)
        bounds = f" (expected {'more than' if lo_open else 'from'} {lo:g} to {hi:g} {unit})"
        if not _DECIMAL_RE.fullmatch(value):
            raise self.fail(elem, attr, f"{value!r} is not a decimal number{bounds}")
        number = float(value)
        if number > hi or number < lo or (lo_open and number == lo):
            raise self.fail(elem, attr, f"{value} is out of range{bounds}")
        return number

    def onoff(self, elem: _Elem, attr: str, default: str) -> bool:
        return self.choice(elem, attr, default, ("on", "off")) == "on"

    def choice(self, elem: _Elem, attr: str, default: str, allowed: tuple[str, ...],
               why: str = "") -> str:
        value = self.raw(elem, attr, default)
        if value not in allowed:
            options = " or ".join(f'"{a}"' for a in allowed)
            raise self.fail(elem, attr, f"{value!r} is not allowed: expected {options}{why}")
        return value

    def ipv4(self, elem: _Elem, attr: str) -> IPv4Address:
        value = self.raw(elem, attr)
        try:
            addr = ipaddress.IPv4Address(value)
        except ValueError:
            raise self.fail(elem, attr, f"{value!r} is not an IPv4 address (a.b.c.d)") from None
        if addr.is_unspecified or addr.is_multicast or addr == IPv4Address("255.255.255.255"):
            raise self.fail(elem, attr, f"{addr} cannot be the address of a host")
        return addr

    def name(self, elem: _Elem, attr: str, what: str) -> str:
        value = self.raw(elem, attr)
        if not NAME_RE.fullmatch(value):
            raise self.fail(elem, attr, f"{value!r} is not a valid {what} name ({NAME_RULE})")
        return value

    def text(self, elem: _Elem, attr: str, default: str | None = _REQUIRED) -> str | None:
        value = elem.attrib.get(attr)
        if value is None and default is not _REQUIRED:
            return default
        value = self.raw(elem, attr)
        if not value.strip():
            raise self.fail(elem, attr, "must not be empty")
        return value


def _range(lo: int, hi: int | None, unit: str) -> str:
    unit = f" {unit}" if unit else ""
    if hi is None:
        return f" (expected at least {lo}{unit})"
    return f" (expected {lo} to {hi}{unit})"


# --------------------------------------------------------------------------------------------
# userconfig.xml

_SERVICE_ATTRS = ("defaultprim", "maxloop", "loop_interval", "failover", "autoswap")


def load_userconfig(path: Path) -> ServiceConfig:
    return parse_userconfig(_read_text(path), path)


def parse_userconfig(text: str, source: Path) -> ServiceConfig:
    """Validate userconfig.xml given as text (e.g. an edit, before it is saved)."""
    return _parse_userconfig(text, source)[0]


def _parse_userconfig(text: str, source: Path) -> tuple[ServiceConfig, dict[str, int]]:
    """Return the service and the lines of the values checked later against cluster.xml.

    Attributes are checked before children and children in the order of the file, so that the
    error reported is the first one in the file.
    """
    root, warnings = _parse_xml(text, source, "safe", strip=2)
    ck = _Checker(source)
    ck.attrs(root, (), ())
    (service,) = ck.children(root, {"service": (1, 1)})["service"]
    ck.attrs(service, ("mode",), _SERVICE_ATTRS)
    mode = ck.choice(service, "mode", _REQUIRED, ("mirror",), " (the only module type here)")
    defaultprim = ck.raw(service, "defaultprim", ALONE)
    if defaultprim != ALONE and not NAME_RE.fullmatch(defaultprim):
        raise ck.fail(service, "defaultprim", f'{defaultprim!r} is neither "alone" nor a node name')
    maxloop = ck.integer(service, "maxloop", 3, 0, 1000)
    loop_interval = ck.decimal(service, "loop_interval", "24", 0, 8760, "hours", lo_open=True)
    failover = ck.onoff(service, "failover", "on")
    autoswap = ck.onoff(service, "autoswap", "off")
    if autoswap and defaultprim == ALONE:
        warnings.append(
            f'{source}:{service.line}: service@autoswap: "on" has no effect while defaultprim '
            'is "alone"'
        )
    ck.children(service, {tag: (1 if tag == "heart" else 0, 1) for tag in _SECTIONS})
    lines: dict[str, int] = {"service": service.line}
    sections = {child.tag: _SECTIONS[child.tag](ck, child, lines) for child in service.children}
    config = ServiceConfig(
        source=source,
        mode=mode,
        defaultprim=defaultprim,
        maxloop=maxloop,
        loop_interval_h=loop_interval,
        failover=failover,
        autoswap=autoswap,
        heart=sections["heart"],
        vips=sections.get("vip", ()),
        errd=sections.get("errd"),
        rfs=sections.get("rfs"),
        splitbrain=sections.get("splitbrain"),
        user=sections.get("user") or UserScripts(300, 300, "userlog"),
        warnings=tuple(warnings),
    )
    return config, lines


def _heart(ck: _Checker, heart: _Elem, lines: dict[str, int]) -> HeartConfig:
    ck.attrs(heart, (), ("pulse", "timeout", "port"))
    pulse = ck.integer(heart, "pulse", 700, 10, 60000, "ms")
    timeout = ck.integer(heart, "timeout", 30000, 3 * pulse, 3600000, "ms")
    port = ck.integer(heart, "port", 4800, 1, 65535)
    networks: list[HeartbeatNet] = []
    flow_line = 0
    for beat in ck.children(heart, {"heartbeat": (1, None)})["heartbeat"]:
        ck.leaf(beat, ("name",), ("ident",))
        name = ck.name(beat, "name", "network")
        if f"heartbeat:{name}" in lines:
            seen = lines[f"heartbeat:{name}"]
            raise ck.fail(beat, "name", f"network {name!r} is already listed on line {seen}")
        ident = ck.text(beat, "ident", None)
        if ident == FLOW_IDENT:
            if flow_line:
                raise ck.fail(
                    beat, "ident", f'only one network carries replication (ident="flow" is '
                    f"already on line {flow_line})"
                )
            flow_line = beat.line
        lines[f"heartbeat:{name}"] = beat.line
        networks.append(HeartbeatNet(name, ident))
    return HeartConfig(pulse, timeout, port, tuple(networks))


def _vips(ck: _Checker, vip: _Elem, lines: dict[str, int]) -> tuple[VipInterface, ...]:
    ck.attrs(vip, (), ())
    (interface_list,) = ck.children(vip, {"interface_list": (1, 1)})["interface_list"]
    ck.attrs(interface_list, (), ())
    interfaces = ck.children(interface_list, {"interface": (1, None)})["interface"]
    return tuple(_vip_interface(ck, interface, lines) for interface in interfaces)


def _vip_interface(ck: _Checker, interface: _Elem, lines: dict[str, int]) -> VipInterface:
    ck.attrs(interface, (), ("check", "arpreroute", "name"))
    check = ck.onoff(interface, "check", "on")
    arpreroute = ck.onoff(interface, "arpreroute", "on")
    ifname = ck.raw(interface, "name", "") or None
    if ifname is not None and not _valid_ifname(ifname):
        raise ck.fail(
            interface, "name", f"{ifname!r} is not a Linux interface name (1 to "
            f"{IFNAME_MAX} characters, no '/', ':' or spaces)"
        )
    (real,) = ck.children(interface, {"real_interface": (1, 1)})["real_interface"]
    ck.attrs(real, (), ())
    addrs: list[VirtualAddr] = []
    for virtual in ck.children(real, {"virtual_addr": (1, None)})["virtual_addr"]:
        ck.leaf(virtual, ("addr",), ("where",))
        addr = ck.ipv4(virtual, "addr")
        if f"vip:{addr}" in lines:
            raise ck.fail(
                virtual, "addr", f"{addr} is already listed on line {lines[f'vip:{addr}']}"
            )
        lines[f"vip:{addr}"] = virtual.line
        where = ck.choice(
            virtual, "where", ONE_SIDE_ALIAS, (ONE_SIDE_ALIAS,),
            " (the only mode supported: the VIP is an alias on the primary only)",
        )
        addrs.append(VirtualAddr(addr, where))
    return VipInterface(check, arpreroute, ifname, tuple(addrs))


def _valid_ifname(name: str) -> bool:
    return (
        0 < len(name) <= IFNAME_MAX
        and name not in (".", "..")
        and not any(c in "/:" or c.isspace() for c in name)
    )


def _errd(ck: _Checker, errd: _Elem, lines: dict[str, int]) -> ErrdConfig:
    ck.attrs(errd, (), ("polltimer",))
    polltimer = ck.decimal(errd, "polltimer", "10", 0.1, 3600, "seconds")
    procs: list[ProcCheck] = []
    seen: dict[str, int] = {}
    for proc in ck.children(errd, {"proc": (0, None)})["proc"]:
        ck.leaf(proc, ("name",), ("atleast", "action", "class"))
        name = ck.raw(proc, "name")
        if not 0 < len(name) <= COMM_MAX:
            raise ck.fail(
                proc, "name", f"{name!r} has {len(name)} characters; Linux keeps only the first "
                f"{COMM_MAX} of a process name, so write 1 to {COMM_MAX} (as shown by ps -o comm)"
            )
        if name in seen:
            raise ck.fail(proc, "name", f"{name!r} is already monitored on line {seen[name]}")
        seen[name] = proc.line
        procs.append(ProcCheck(
            name=name,
            atleast=ck.integer(proc, "atleast", 1, 0, None),
            action=ck.choice(proc, "action", "restart", ("restart", "stop")),
            klass=ck.choice(proc, "class", "prim", ("prim", "both")),
        ))
    return ErrdConfig(polltimer, tuple(procs))


def _rfs(ck: _Checker, rfs: _Elem, lines: dict[str, int]) -> RfsConfig:
    ck.attrs(rfs, (), ("mountover", "async", "acl", "nbrei"))
    mountover = ck.onoff(rfs, "mountover", "off")
    async_mode = ck.choice(rfs, "async", "second", ("second", "none"))
    acl = ck.onoff(rfs, "acl", "off")
    nbrei = ck.integer(rfs, "nbrei", 3, 1, 64)
    dirs: list[ReplicatedDir] = []
    seen: list[tuple[PurePosixPath, int]] = []
    for replicated in ck.children(rfs, {"replicated": (1, None)})["replicated"]:
        ck.leaf(replicated, ("dir",), ("mode",))
        path = _replicated_path(ck, replicated)
        for other, other_line in seen:
            _check_not_nested(ck, replicated, path, other, other_line)
        seen.append((path, replicated.line))
        mode = ck.choice(replicated, "mode", "read_only", ("read_only",),
                         " (the secondary's copy is read-only)")
        dirs.append(ReplicatedDir(path, mode))
    return RfsConfig(mountover, async_mode, acl, nbrei, tuple(dirs))


def _replicated_path(ck: _Checker, elem: _Elem) -> PurePosixPath:
    value = ck.raw(elem, "dir")
    if not value.startswith("/"):
        raise ck.fail(elem, "dir", f"{value!r} is not an absolute path")
    # Normalise by hand: PurePosixPath keeps a leading "//" and would accept "..".
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ck.fail(elem, "dir", f"{value!r} must not contain '..'")
    if not parts:
        raise ck.fail(elem, "dir", "the root directory / cannot be replicated")
    if any(c.isspace() and c != " " for c in value):
        raise ck.fail(elem, "dir", f"{value!r} contains a control character")
    return PurePosixPath("/" + "/".join(parts))


def _check_not_nested(ck: _Checker, elem: _Elem, path: PurePosixPath, other: PurePosixPath,
                      other_line: int) -> None:
    if path == other:
        raise ck.fail(elem, "dir", f"{path} is already replicated (line {other_line})")
    if other in path.parents:
        raise ck.fail(elem, "dir", f"{path} is inside {other} (line {other_line}): replicated "
                                   "directories must not nest")
    if path in other.parents:
        raise ck.fail(elem, "dir", f"{path} contains {other} (line {other_line}): replicated "
                                   "directories must not nest")


def _splitbrain(ck: _Checker, elem: _Elem, lines: dict[str, int]) -> SplitBrainConfig:
    ck.leaf(elem, ("arg",), ("ident", "exec"))
    ck.text(elem, "ident", "witness")
    ck.choice(elem, "exec", "ping", ("ping",), " (the witness is checked with ping)")
    lines["splitbrain"] = elem.line
    return SplitBrainConfig(witness=ck.ipv4(elem, "arg"))


def _user(ck: _Checker, elem: _Elem, lines: dict[str, int]) -> UserScripts:
    ck.leaf(elem, (), ("nicestoptimeout", "forcestoptimeout", "logging"))
    return UserScripts(
        nicestoptimeout_s=ck.integer(elem, "nicestoptimeout", 300, 1, 86400, "seconds"),
        forcestoptimeout_s=ck.integer(elem, "forcestoptimeout", 300, 1, 86400, "seconds"),
        logging=ck.choice(elem, "logging", "userlog", ("userlog", "none")),
    )


# The sections of <service>: each reads its element (recording lines needed by cross-checks).
_SECTIONS: dict[str, Callable[[_Checker, _Elem, dict[str, int]], Any]] = {
    "heart": _heart,
    "vip": _vips,
    "errd": _errd,
    "rfs": _rfs,
    "splitbrain": _splitbrain,
    "user": _user,
}


# --------------------------------------------------------------------------------------------
# cluster.xml


def load_cluster(path: Path) -> ClusterConfig:
    return parse_cluster(_read_text(path), path)


def parse_cluster(text: str, source: Path) -> ClusterConfig:
    root, warnings = _parse_xml(text, source, "cluster", strip=1)
    ck = _Checker(source)
    ck.attrs(root, (), ())
    (lans_elem,) = ck.children(root, {"lans": (1, 1)})["lans"]
    ck.attrs(lans_elem, (), ())
    lans: list[str] = []
    lan_lines: dict[str, int] = {}
    addr_lines: dict[IPv4Address, int] = {}
    names: list[str] = []  # the two node names, in order of first appearance
    addrs: dict[str, list[tuple[str, IPv4Address]]] = {}
    for lan in ck.children(lans_elem, {"lan": (1, None)})["lan"]:
        ck.attrs(lan, ("name",), ())
        lan_name = ck.name(lan, "name", "lan")
        if lan_name in lan_lines:
            raise ck.fail(lan, "name", f"lan {lan_name!r} is already defined on line "
                                       f"{lan_lines[lan_name]}")
        lan_lines[lan_name] = lan.line
        lans.append(lan_name)
        on_lan: list[str] = []
        for node in ck.children(lan, {"node": (0, None)})["node"]:
            ck.leaf(node, ("name", "addr"), ())
            name = ck.name(node, "name", "node")
            if name == ALONE:
                raise ck.fail(node, "name", f'"{ALONE}" is reserved (service@defaultprim="alone")')
            if name in on_lan:
                raise ck.fail(node, "name", f"node {name!r} is listed twice on lan {lan_name!r}")
            if name not in names:
                if len(names) == 2:
                    raise ck.fail(node, "name", f"a cluster has exactly two nodes: {names[0]!r} "
                                                f"and {names[1]!r}; {name!r} would be a third")
                names.append(name)
            addr = ck.ipv4(node, "addr")
            if addr in addr_lines:
                raise ck.fail(node, "addr", f"{addr} is already used on line {addr_lines[addr]}")
            addr_lines[addr] = node.line
            on_lan.append(name)
            addrs.setdefault(name, []).append((lan_name, addr))
        if len(on_lan) < 2:
            missing = [n for n in names if n not in on_lan]
            listed = f"only {on_lan[0]!r}" if on_lan else "no node"
            hint = f" ({missing[0]!r} is missing)" if missing else ""
            raise ck.fail(lan, None, f"lan {lan_name!r} lists {listed}: every lan must list both "
                                     f"nodes of the cluster{hint}")
    nodes = tuple(Node(name, FrozenMap(addrs[name])) for name in names)
    return ClusterConfig(source, tuple(lans), (nodes[0], nodes[1]), tuple(warnings))


def identify_local_node(cluster: ClusterConfig, local_addrs: Iterable[IPv4Address]) -> str:
    """The node one of whose addresses is configured on this machine."""
    local = set(local_addrs)
    mine = [n.name for n in cluster.nodes if local & set(n.addrs.values())]
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise ConfigError(
            cluster.source, None, "lans/lan/node@addr",
            "none of the node addresses is configured on this machine, so it is neither "
            + " nor ".join(repr(n.name) for n in cluster.nodes),
        )
    raise ConfigError(
        cluster.source, None, "lans/lan/node@addr",
        "addresses of both nodes are configured on this machine; cannot tell which node it is",
    )


# --------------------------------------------------------------------------------------------
# Both files together


def load_node_config(cluster_xml: Path, userconfig: Path) -> NodeConfig:
    cluster = load_cluster(cluster_xml)
    return parse_node_config(cluster, _read_text(userconfig), userconfig)


def parse_node_config(cluster: ClusterConfig, userconfig_text: str, source: Path) -> NodeConfig:
    """Validate userconfig.xml text and cross-check it against an already loaded cluster.xml."""
    service, lines = _parse_userconfig(userconfig_text, source)
    _cross_check(cluster, service, lines)
    return NodeConfig(cluster, service)


def _cross_check(cluster: ClusterConfig, service: ServiceConfig, lines: dict[str, int]) -> None:
    src = service.source
    for net in service.heart.networks:
        if net.name not in cluster.lans:
            raise ConfigError(
                src, lines[f"heartbeat:{net.name}"], "heart/heartbeat@name",
                f"network {net.name!r} is not a lan of {cluster.source} "
                f"(lans: {', '.join(cluster.lans)})",
            )
    node_names = [n.name for n in cluster.nodes]
    if service.defaultprim != ALONE and service.defaultprim not in node_names:
        raise ConfigError(
            src, lines["service"], "service@defaultprim",
            f'{service.defaultprim!r} is neither "alone" nor a node of {cluster.source} '
            f"({', '.join(node_names)})",
        )
    # An address of a node given as VIP or witness would be taken away from / confused with it.
    owner = {addr: (node.name, lan) for node in cluster.nodes for lan, addr in node.addrs.items()}
    for interface in service.vips:
        for virtual in interface.addrs:
            if virtual.addr in owner:
                name, lan = owner[virtual.addr]
                raise ConfigError(
                    src, lines[f"vip:{virtual.addr}"],
                    "vip/interface_list/interface/real_interface/virtual_addr@addr",
                    f"{virtual.addr} is the address of node {name!r} on lan {lan!r}, "
                    "not a free virtual address",
                )
    if service.splitbrain is not None and service.splitbrain.witness in owner:
        name, lan = owner[service.splitbrain.witness]
        raise ConfigError(
            src, lines["splitbrain"], "splitbrain@arg",
            f"the witness {service.splitbrain.witness} is node {name!r} (lan {lan!r}); "
            "it must be a third machine",
        )
