"""userconfig.xml / cluster.xml parsing: the reference file, a lab config, and one bad input per
rule, each checked for the exact file, line and field named in the error."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path, PurePosixPath

import pytest

from appliance.config import (
    ClusterConfig,
    HeartbeatNet,
    NodeConfig,
    ReplicatedDir,
    ServiceConfig,
    identify_local_node,
    load_cluster,
    load_node_config,
    load_userconfig,
    parse_cluster,
    parse_node_config,
    parse_userconfig,
)
from appliance.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "config"
REFERENCE = FIXTURES / "reference_userconfig.xml"
SRC = Path("/etc/mirrorha/mirror/conf/userconfig.xml")
CLUSTER_SRC = Path("/etc/mirrorha/cluster.xml")

# Line numbers matter: the bad cases below name them.
LAB = """\
<!DOCTYPE safe>
<safe>
<service mode="mirror" defaultprim="node1" maxloop="3" loop_interval="0.01" failover="on" autoswap="on">
  <heart pulse="100" timeout="600" port="4800">
    <heartbeat name="default" ident="flow"/>
    <heartbeat name="second"/>
  </heart>
  <vip>
    <interface_list>
      <interface check="on" arpreroute="on" name="veth0">
        <real_interface>
          <virtual_addr addr="192.0.2.100" where="one_side_alias"/>
        </real_interface>
      </interface>
    </interface_list>
  </vip>
  <errd polltimer="0.5">
    <proc name="sleep" atleast="1" action="restart" class="prim"/>
  </errd>
  <rfs mountover="off" async="second" acl="off" nbrei="3">
    <replicated dir="/srv/data" mode="read_only"/>
  </rfs>
  <splitbrain ident="witness" exec="ping" arg="203.0.113.1"/>
  <user nicestoptimeout="5" forcestoptimeout="5" logging="userlog"/>
</service>
</safe>
"""  # noqa: E501

CLUSTER = """\
<cluster>
  <lans>
    <lan name="default">
      <node name="node1" addr="192.0.2.1"/>
      <node name="node2" addr="192.0.2.2"/>
    </lan>
    <lan name="second">
      <node name="node1" addr="198.51.100.1"/>
      <node name="node2" addr="198.51.100.2"/>
    </lan>
  </lans>
</cluster>
"""

VADDR = "vip/interface_list/interface/real_interface/virtual_addr@addr"

BOMB = """\
<?xml version="1.0"?>
<!DOCTYPE safe [
<!ENTITY lol "lol">
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<safe>&lol3;</safe>
"""


def edit(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence, so that a case cannot silently test nothing."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def filled_reference() -> str:
    text = REFERENCE.read_text(encoding="utf-8")
    text = edit(text, 'addr="VIRTUAL_TO_BE_DEFINED"', 'addr="192.0.2.100"')
    return edit(text, 'name="PROCESS_NAME"', 'name="postgres"')


def raises_config_error(call: object, *args: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


# --------------------------------------------------------------------------------------------
# Good files


def test_reference_userconfig_parses_once_placeholders_are_filled() -> None:
    config = parse_userconfig(filled_reference(), REFERENCE)

    assert config.source == REFERENCE
    assert (config.mode, config.defaultprim, config.maxloop) == ("mirror", "alone", 3)
    assert (config.loop_interval_h, config.failover, config.autoswap) == (24.0, True, False)
    assert (config.heart.pulse_ms, config.heart.timeout_ms, config.heart.port) == (700, 30000, 4800)
    assert config.heart.networks == (HeartbeatNet("default", "flow"),)
    assert config.heart.flow_network == "default"
    (vip,) = config.vips
    assert (vip.check, vip.arpreroute, vip.name) == (True, True, None)
    (vaddr,) = vip.addrs
    assert (vaddr.addr, vaddr.where) == (IPv4Address("192.0.2.100"), "one_side_alias")
    assert config.errd is not None and config.errd.polltimer_s == 10.0
    (proc,) = config.errd.procs
    assert (proc.name, proc.atleast, proc.action, proc.klass) == ("postgres", 1, "restart", "prim")
    assert config.rfs is not None
    assert (config.rfs.mountover, config.rfs.async_mode, config.rfs.acl, config.rfs.nbrei) == (
        False, "second", False, 3)
    assert config.rfs.dirs == (
        ReplicatedDir(PurePosixPath("/test1replicated"), "read_only"),
        ReplicatedDir(PurePosixPath("/test2replicated"), "read_only"),
    )
    assert config.splitbrain is None
    assert (config.user.nicestoptimeout_s, config.user.forcestoptimeout_s, config.user.logging) == (
        300, 300, "userlog")


def test_reference_curly_quotes_are_read_as_plain_quotes_with_a_warning() -> None:
    assert "name=”default” ident=”flow”" in REFERENCE.read_text(encoding="utf-8")
    config = parse_userconfig(filled_reference(), REFERENCE)
    assert config.warnings == (
        f"{REFERENCE}:7: typographic quotes around attribute values were read as plain quotes",
    )


@pytest.mark.parametrize("quoted", ["“second”", "”second”", " “second”"])
def test_either_curly_quote_delimits_a_value(quoted: str) -> None:
    text = edit(LAB, '<heartbeat name="second"/>', f"<heartbeat name={quoted}/>")
    config = parse_userconfig(text, SRC)
    assert config.heart.networks[1] == HeartbeatNet("second", None)
    assert config.warnings == (
        f"{SRC}:6: typographic quotes around attribute values were read as plain quotes",
    )


def test_curly_quotes_in_comments_are_left_alone() -> None:
    text = edit(LAB, "<safe>", '<safe><!-- was name=”x” -->')
    assert parse_userconfig(text, SRC).warnings == ()


def test_a_lone_curly_quote_gives_a_hint_in_the_parse_error() -> None:
    text = edit(LAB, '<heartbeat name="second"/>', '<heartbeat name="second”/>')
    error = raises_config_error(parse_userconfig, text, SRC)
    # The parse breaks on the next line, where the open value meets "<"; the hint points back.
    assert (error.line, error.field) == (7, "xml")
    assert "typographic quote on line 6" in error.message


@pytest.mark.parametrize(
    ("placeholder", "line", "field"),
    [("VIRTUAL_TO_BE_DEFINED", 17, VADDR), ("PROCESS_NAME", 27, "errd/proc@name")],
)
def test_unfilled_placeholder_is_named(placeholder: str, line: int, field: str) -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    if placeholder == "PROCESS_NAME":
        text = edit(text, 'addr="VIRTUAL_TO_BE_DEFINED"', 'addr="192.0.2.100"')
    error = raises_config_error(parse_userconfig, text, REFERENCE)
    assert (error.file, error.line, error.field) == (str(REFERENCE), line, field)
    assert "placeholder not filled in" in error.message and placeholder in error.message


def test_lab_config_parses_with_cluster(tmp_path: Path) -> None:
    cluster_xml, userconfig = tmp_path / "cluster.xml", tmp_path / "userconfig.xml"
    cluster_xml.write_text(CLUSTER)
    userconfig.write_text(LAB)

    node_config = load_node_config(cluster_xml, userconfig)

    service = node_config.service
    assert (service.defaultprim, service.autoswap, service.loop_interval_h) == ("node1", True, 0.01)
    assert (service.heart.pulse_ms, service.heart.timeout_ms) == (100, 600)
    assert service.heart.networks == (HeartbeatNet("default", "flow"), HeartbeatNet("second", None))
    assert service.vips[0].name == "veth0"
    assert service.errd is not None and service.errd.polltimer_s == 0.5
    assert service.splitbrain is not None
    assert service.splitbrain.witness == IPv4Address("203.0.113.1")
    assert service.user.nicestoptimeout_s == 5
    assert service.warnings == ()
    cluster = node_config.cluster
    assert cluster.lans == ("default", "second")
    assert [n.name for n in cluster.nodes] == ["node1", "node2"]
    assert cluster.node("node2").addr("second") == IPv4Address("198.51.100.2")
    assert dict(cluster.node("node1").addrs) == {
        "default": IPv4Address("192.0.2.1"), "second": IPv4Address("198.51.100.1")}
    assert cluster.peer_of("node1").name == "node2"
    assert cluster.peer_of("node2").name == "node1"
    # Frozen all the way down: usable as a dict key, equal when parsed again.
    assert hash(node_config) == hash(load_node_config(cluster_xml, userconfig))
    assert node_config == load_node_config(cluster_xml, userconfig)


def test_minimal_userconfig_takes_the_defaults() -> None:
    text = (
        '<safe><service mode="mirror"><heart><heartbeat name="default"/></heart></service></safe>'
    )
    config = parse_userconfig(text, SRC)
    assert isinstance(config, ServiceConfig)
    assert (config.defaultprim, config.maxloop, config.loop_interval_h) == ("alone", 3, 24.0)
    assert (config.failover, config.autoswap) == (True, False)
    assert (config.heart.pulse_ms, config.heart.timeout_ms, config.heart.port) == (700, 30000, 4800)
    assert (config.vips, config.errd, config.rfs, config.splitbrain) == ((), None, None, None)
    assert (config.user.nicestoptimeout_s, config.user.logging) == (300, "userlog")


def test_autoswap_without_a_preferred_node_warns() -> None:
    text = edit(LAB, 'defaultprim="node1"', 'defaultprim="alone"')
    (warning,) = parse_userconfig(text, SRC).warnings
    assert warning.startswith(f"{SRC}:3: service@autoswap")


def test_replicated_dirs_are_normalised() -> None:
    text = edit(LAB, 'dir="/srv/data"', 'dir="//srv/./data/"')
    config = parse_userconfig(text, SRC)
    assert config.rfs is not None
    assert config.rfs.dirs[0].path == PurePosixPath("/srv/data")


# --------------------------------------------------------------------------------------------
# Bad userconfig.xml: (old, new) edit of LAB, then the expected line, field and message part

BAD_USERCONFIG = {
    "malformed: unclosed element": (
        '<heartbeat name="second"/>', '<heartbeat name="second">', 7, "xml", "mismatched tag"),
    "malformed: bad attribute syntax": (
        'pulse="100"', "pulse=100", 4, "xml", "malformed XML"),
    "unknown element": (
        '<proc name="sleep"', '<process name="sleep"', 18, "errd/process", "unknown element"),
    "unknown element inside a leaf": (
        '<heartbeat name="second"/>', '<heartbeat name="second"><x/></heartbeat>',
        6, "heart/heartbeat/x", "unknown element"),
    "unknown element in service": (
        "<vip>", "<vips/><vip>", 8, "vips", "unknown element"),
    "unknown attribute": (
        'pulse="100"', 'puls="100"', 4, "heart@puls", "unknown attribute"),
    "unknown attribute on virtual_addr": (
        'where="one_side_alias"', 'where="one_side_alias" mask="24"', 12,
        VADDR.replace("@addr", "@mask"), "unknown attribute"),
    "missing required attribute": (
        '<heartbeat name="second"/>', "<heartbeat/>", 6, "heart/heartbeat@name", "missing"),
    "missing service mode": ('mode="mirror" ', "", 3, "service@mode", "missing"),
    "missing required element": (
        '<replicated dir="/srv/data" mode="read_only"/>', "", 20, "rfs/replicated",
        "at least 1 <replicated> is required"),
    "two hearts": ("</heart>", "</heart><heart/>", 7, "heart", "only 1 <heart> allowed"),
    "stray text": ("  </heart>", "  oops\n</heart>", 7, "heart", "unexpected text"),
    "wrong mode": ('mode="mirror"', 'mode="farm"', 3, "service@mode", "farm"),
    "pulse below range": ('pulse="100"', 'pulse="5"', 4, "heart@pulse", "out of range"),
    "pulse not a number": ('pulse="100"', 'pulse="1e2"', 4, "heart@pulse", "not a whole number"),
    "timeout below 3 x pulse": (
        'timeout="600"', 'timeout="299"', 4, "heart@timeout", "expected 300 to 3600000"),
    "port out of range": ('port="4800"', 'port="70000"', 4, "heart@port", "out of range"),
    "duplicate heartbeat network": (
        '<heartbeat name="second"/>', '<heartbeat name="default"/>', 6, "heart/heartbeat@name",
        "already listed on line 5"),
    "two flow networks": (
        '<heartbeat name="second"/>', '<heartbeat name="second" ident="flow"/>', 6,
        "heart/heartbeat@ident", "only one network"),
    "bad IPv4 address": ('addr="192.0.2.100"', 'addr="192.0.2.300"', 12, VADDR, "not an IPv4"),
    "IPv4 with leading zero": ('addr="192.0.2.100"', 'addr="192.0.2.010"', 12, VADDR, "IPv4"),
    "multicast VIP": ('addr="192.0.2.100"', 'addr="224.0.0.1"', 12, VADDR, "cannot be"),
    "unsupported where": (
        'where="one_side_alias"', 'where="both_sides"', 12, VADDR.replace("@addr", "@where"),
        "the only mode supported"),
    "bad interface name": (
        'name="veth0"', 'name="a/b"', 10, "vip/interface_list/interface@name", "interface name"),
    "relative replicated dir": (
        'dir="/srv/data"', 'dir="srv/data"', 21, "rfs/replicated@dir", "not an absolute path"),
    "dotdot in replicated dir": (
        'dir="/srv/data"', 'dir="/srv/../etc"', 21, "rfs/replicated@dir", "'..'"),
    "root as replicated dir": ('dir="/srv/data"', 'dir="/"', 21, "rfs/replicated@dir", "root"),
    "nested replicated dir": (
        '<replicated dir="/srv/data" mode="read_only"/>',
        '<replicated dir="/srv/data" mode="read_only"/>\n<replicated dir="/srv/data/sub"/>',
        22, "rfs/replicated@dir", "inside /srv/data (line 21)"),
    "enclosing replicated dir": (
        '<replicated dir="/srv/data" mode="read_only"/>',
        '<replicated dir="/srv/data" mode="read_only"/>\n<replicated dir="/srv"/>',
        22, "rfs/replicated@dir", "contains /srv/data"),
    "repeated replicated dir": (
        '<replicated dir="/srv/data" mode="read_only"/>',
        '<replicated dir="/srv/data" mode="read_only"/>\n<replicated dir="/srv/data/"/>',
        22, "rfs/replicated@dir", "already replicated"),
    "replicated mode": ('mode="read_only"', 'mode="read_write"', 21, "rfs/replicated@mode", "read"),
    "nbrei out of range": ('nbrei="3"', 'nbrei="0"', 20, "rfs@nbrei", "expected 1 to 64"),
    "async value": ('async="second"', 'async="first"', 20, "rfs@async", '"second" or "none"'),
    "bad on/off": ('failover="on"', 'failover="yes"', 3, "service@failover", '"on" or "off"'),
    "bad on/off on interface": (
        'check="on"', 'check="true"', 10, "vip/interface_list/interface@check", '"on" or "off"'),
    "maxloop negative": ('maxloop="3"', 'maxloop="-1"', 3, "service@maxloop", "whole number"),
    "loop_interval zero": (
        'loop_interval="0.01"', 'loop_interval="0"', 3, "service@loop_interval", "more than 0"),
    "loop_interval nan": (
        'loop_interval="0.01"', 'loop_interval="nan"', 3, "service@loop_interval", "decimal"),
    "defaultprim not a name": (
        'defaultprim="node1"', 'defaultprim="no de"', 3, "service@defaultprim", "node name"),
    "polltimer too small": (
        'polltimer="0.5"', 'polltimer="0.05"', 17, "errd@polltimer", "out of range"),
    "process name too long": (
        'name="sleep"', 'name="postgres-checkpointer"', 18, "errd/proc@name", "15"),
    "proc action": ('action="restart"', 'action="kill"', 18, "errd/proc@action", "restart"),
    "proc class": ('class="prim"', 'class="second"', 18, "errd/proc@class", "both"),
    "splitbrain exec": ('exec="ping"', 'exec="arping"', 23, "splitbrain@exec", "ping"),
    "splitbrain witness": ('arg="203.0.113.1"', 'arg="witness"', 23, "splitbrain@arg", "IPv4"),
    "user timeout": (
        'nicestoptimeout="5"', 'nicestoptimeout="0"', 24, "user@nicestoptimeout", "1 to 86400"),
    "user logging": ('logging="userlog"', 'logging="syslog"', 24, "user@logging", "userlog"),
    "nested root": ("<service", "<safe/><service", 3, "safe", "unknown element <safe>"),
    "DOCTYPE names another root": ("<!DOCTYPE safe>", "<!DOCTYPE cluster>", 1, "DOCTYPE", "<safe>"),
    "external DTD": (
        "<!DOCTYPE safe>", '<!DOCTYPE safe SYSTEM "file:///etc/passwd">', 1, "DOCTYPE", "external"),
    "internal DTD subset": (
        "<!DOCTYPE safe>", '<!DOCTYPE safe [\n<!ATTLIST heart pulse CDATA "5">\n]>', 1, "DOCTYPE",
        "internal DTD subset"),
}


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "message"), BAD_USERCONFIG.values(), ids=BAD_USERCONFIG.keys()
)
def test_bad_userconfig_names_file_line_and_field(
    tmp_path: Path, old: str, new: str, line: int, field: str, message: str
) -> None:
    path = tmp_path / "userconfig.xml"
    path.write_text(edit(LAB, old, new))

    error = raises_config_error(load_userconfig, path)

    assert (error.file, error.line, error.field) == (str(path), line, field), str(error)
    assert message in error.message, str(error)
    assert str(error).startswith(f"{path}:{line}: {field}: ")


def test_entity_bomb_is_refused_by_defusedxml() -> None:
    error = raises_config_error(parse_userconfig, BOMB, SRC)
    assert (error.file, error.line, error.field) == (str(SRC), 3, "DOCTYPE")
    assert "EntitiesForbidden" in error.message


def test_wrong_root_element() -> None:
    error = raises_config_error(parse_userconfig, "<!-- a comment -->\n<cluster/>", SRC)
    assert (error.file, error.line, error.field) == (str(SRC), 2, "cluster")
    assert "<safe>" in error.message


def test_undefined_entity_is_malformed() -> None:
    error = raises_config_error(parse_userconfig, edit(LAB, 'name="sleep"', 'name="&x;"'), SRC)
    assert (error.line, error.field) == (18, "xml")


def test_empty_document_is_malformed() -> None:
    error = raises_config_error(parse_userconfig, "", SRC)
    assert (error.file, error.line, error.field) == (str(SRC), 1, "xml")


def test_unreadable_or_undecodable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.xml"
    error = raises_config_error(load_userconfig, missing)
    assert (error.file, error.line, error.field) == (str(missing), None, "file")

    latin1 = tmp_path / "latin1.xml"
    latin1.write_bytes(LAB.replace("<safe>", "<!-- caf\xe9 -->\n<safe>").encode("latin-1"))
    error = raises_config_error(load_userconfig, latin1)
    assert (error.file, error.line, error.field) == (str(latin1), 2, "file")


# --------------------------------------------------------------------------------------------
# Cross-checks between userconfig.xml and cluster.xml

CROSS = {
    "unknown heartbeat network": (
        '<heartbeat name="second"/>', '<heartbeat name="third"/>', 6, "heart/heartbeat@name",
        "'third' is not a lan"),
    "unknown defaultprim node": (
        'defaultprim="node1"', 'defaultprim="node3"', 3, "service@defaultprim", "node3"),
    "VIP is a node address": (
        'addr="192.0.2.100"', 'addr="192.0.2.2"', 12, VADDR, "address of node 'node2'"),
    "witness is a node": (
        'arg="203.0.113.1"', 'arg="198.51.100.1"', 23, "splitbrain@arg", "third machine"),
}


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "message"), CROSS.values(), ids=CROSS.keys()
)
def test_cross_check_errors_point_at_userconfig(
    tmp_path: Path, old: str, new: str, line: int, field: str, message: str
) -> None:
    cluster_xml, userconfig = tmp_path / "cluster.xml", tmp_path / "userconfig.xml"
    cluster_xml.write_text(CLUSTER)
    userconfig.write_text(edit(LAB, old, new))
    parse_userconfig(userconfig.read_text(), userconfig)  # valid on its own

    error = raises_config_error(load_node_config, cluster_xml, userconfig)

    assert (error.file, error.line, error.field) == (str(userconfig), line, field), str(error)
    assert message in error.message, str(error)


def test_parse_node_config_validates_an_edit_against_a_loaded_cluster() -> None:
    cluster = parse_cluster(CLUSTER, CLUSTER_SRC)
    assert isinstance(parse_node_config(cluster, LAB, SRC), NodeConfig)
    text = edit(LAB, 'defaultprim="node1"', 'defaultprim="node2"')
    assert parse_node_config(cluster, text, SRC).service.defaultprim == "node2"


# --------------------------------------------------------------------------------------------
# cluster.xml

LAN2_NODE2 = '      <node name="node2" addr="198.51.100.2"/>\n'

BAD_CLUSTER = {
    "one node": (
        [('      <node name="node2" addr="192.0.2.2"/>\n', ""), (LAN2_NODE2, "")],
        3, "lans/lan", "only 'node1'"),
    "duplicate address on a lan": (
        [('addr="192.0.2.2"', 'addr="192.0.2.1"')], 5, "lans/lan/node@addr",
        "already used on line 4"),
    "duplicate address across lans": (
        [('addr="198.51.100.2"', 'addr="192.0.2.2"')], 9, "lans/lan/node@addr", "line 5"),
    "missing node on a lan": ([(LAN2_NODE2, "")], 7, "lans/lan", "'node2' is missing"),
    "third node": (
        [('<node name="node2" addr="198.51.100.2"/>', '<node name="node3" addr="198.51.100.2"/>')],
        9, "lans/lan/node@name", "exactly two nodes"),
    "node twice on a lan": (
        [('<node name="node2" addr="198.51.100.2"/>', '<node name="node1" addr="198.51.100.2"/>')],
        9, "lans/lan/node@name", "twice"),
    "duplicate lan": ([('name="second"', 'name="default"')], 7, "lans/lan@name", "line 3"),
    "bad node name": (
        [('name="node1" addr="192.0.2.1"', 'name="-node1" addr="192.0.2.1"')], 4,
        "lans/lan/node@name", "not a valid node name"),
    "node called alone": (
        [('name="node1" addr="192.0.2.1"', 'name="alone" addr="192.0.2.1"')], 4,
        "lans/lan/node@name", "reserved"),
    "bad address": (
        [('addr="192.0.2.1"', 'addr="192.0.2.1/24"')], 4, "lans/lan/node@addr", "IPv4"),
    "unknown attribute": (
        [('addr="192.0.2.1"', 'addr="192.0.2.1" port="1"')], 4, "lans/lan/node@port", "unknown"),
    "missing addr": ([(' addr="192.0.2.1"', "")], 4, "lans/lan/node@addr", "missing"),
    "unknown element": ([("<lans>", "<lan/><lans>")], 2, "lan", "unknown element"),
    "no lan": ([(CLUSTER[CLUSTER.index("    <lan"):CLUSTER.index("  </lans>")], "")],
               2, "lans/lan", "required"),
    "malformed": ([("</lans>", "</lan>")], 11, "xml", "mismatched tag"),
}


@pytest.mark.parametrize(
    ("edits", "line", "field", "message"), BAD_CLUSTER.values(), ids=BAD_CLUSTER.keys()
)
def test_bad_cluster_names_file_line_and_field(
    tmp_path: Path, edits: list[tuple[str, str]], line: int, field: str, message: str
) -> None:
    text = CLUSTER
    for old, new in edits:
        text = edit(text, old, new)
    path = tmp_path / "cluster.xml"
    path.write_text(text)

    error = raises_config_error(load_cluster, path)

    assert (error.file, error.line, error.field) == (str(path), line, field), str(error)
    assert message in error.message, str(error)


def test_cluster_entity_bomb_is_refused() -> None:
    bomb = BOMB.replace("safe", "cluster")
    error = raises_config_error(parse_cluster, bomb, CLUSTER_SRC)
    assert (error.file, error.line, error.field) == (str(CLUSTER_SRC), 3, "DOCTYPE")


def cluster() -> ClusterConfig:
    return parse_cluster(CLUSTER, CLUSTER_SRC)


def test_unknown_node_name_is_a_config_error() -> None:
    error = raises_config_error(cluster().node, "node3")
    assert (error.file, error.field) == (str(CLUSTER_SRC), "node")
    with pytest.raises(ConfigError):
        cluster().peer_of("node3")


def test_node_addr_of_an_unknown_lan() -> None:
    with pytest.raises(KeyError, match="third"):
        cluster().node("node1").addr("third")


@pytest.mark.parametrize(
    ("local", "expected"),
    [
        (["127.0.0.1", "192.0.2.1"], "node1"),
        (["198.51.100.2"], "node2"),
        (["10.0.0.1", "198.51.100.1", "192.0.2.1"], "node1"),
    ],
)
def test_identify_local_node(local: list[str], expected: str) -> None:
    assert identify_local_node(cluster(), [IPv4Address(a) for a in local]) == expected


@pytest.mark.parametrize(
    ("local", "message"),
    [([], "neither"), (["10.0.0.1"], "neither"), (["192.0.2.1", "198.51.100.2"], "both")],
)
def test_identify_local_node_refuses_none_or_both(local: list[str], message: str) -> None:
    error = raises_config_error(identify_local_node, cluster(), [IPv4Address(a) for a in local])
    assert (error.file, error.field) == (str(CLUSTER_SRC), "lans/lan/node@addr")
    assert message in error.message
