"""Completion from QEMU's own schema (query-qmp-schema) and live names.

``SchemaIndex`` answers: command names, argument names (nested, with dots,
following flat-union variants once the tag's value is typed), the values an
argument takes (enum values, booleans), and which arguments name a block node,
a block device or a trace event. ``CompletionData`` adds the live lists
(trace-event names, node names, device names) and ``complete_line`` returns the
candidates for the word under the cursor; ``ShellCompleter`` is the
prompt-toolkit adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from qemu_ext.qmp.parse import tokenize

MAX_DEPTH = 6

BUILTIN_WORDS: dict[str, list[str]] = {
    "/trace": ["list", "on", "off", "capture"],
    "/trace-file": ["on", "off", "flush", "set"],
    "/stats": ["vm", "vcpu", "--watch"],
    "/threads": [],
    "/mtree": ["lookup"],
    "/l2cache": [],
    "/help": [],
    "/quit": [],
}

_NODE_ARG = re.compile(r"(^|-)(node-name|node|overlay|top-node|base-node|target-node|source-node)$")


def _is_node_arg(name: str) -> bool:
    return bool(_NODE_ARG.search(name))


@dataclass
class SchemaIndex:
    """query-qmp-schema, indexed by name."""

    entities: dict[str, dict[str, Any]]
    commands: list[str] = field(default_factory=list)

    @classmethod
    def from_schema(cls, schema: Iterable[dict[str, Any]]) -> SchemaIndex:
        ents = {str(e["name"]): e for e in schema if isinstance(e, dict) and "name" in e}
        cmds = sorted(n for n, e in ents.items() if e.get("meta-type") == "command")
        return cls(ents, cmds)

    # -- types ------------------------------------------------------------------------------------

    def _members(self, type_name: str, chosen: dict[str, Any], depth: int = 0) -> dict[str, str]:
        """Member name -> type name of an object type; variants chosen by the tag value typed so far."""
        ent = self.entities.get(type_name)
        if ent is None or depth > MAX_DEPTH:
            return {}
        if ent.get("meta-type") == "alternate":
            out: dict[str, str] = {}
            for m in ent.get("members", []):
                out.update(self._members(m["type"], chosen, depth + 1))
            return out
        if ent.get("meta-type") != "object":
            return {}
        out = {m["name"]: m["type"] for m in ent.get("members", [])}
        tag = ent.get("tag")
        variants = ent.get("variants", [])
        if tag and variants:
            value = chosen.get(tag)
            picked = [v for v in variants if v["case"] == value] if value is not None else variants
            for v in picked:
                for name, t in self._members(v["type"], chosen, depth + 1).items():
                    out.setdefault(name, t)
        return out

    def command_arg_type(self, command: str) -> Optional[str]:
        ent = self.entities.get(command)
        if not ent or ent.get("meta-type") != "command":
            return None
        return ent.get("arg-type")

    def arg_names(self, command: str, typed: Optional[dict[str, Any]] = None) -> list[str]:
        """Top-level argument names of a command."""
        t = self.command_arg_type(command)
        return sorted(self._members(t, typed or {})) if t else []

    def resolve(self, command: str, dotted: str, typed: Optional[dict[str, Any]] = None) -> Optional[str]:
        """Type name of ``a.b.c`` in the command's arguments (None when unknown)."""
        t = self.command_arg_type(command)
        typed = typed or {}
        sub: Any = typed
        for part in dotted.split("."):
            if t is None:
                return None
            members = self._members(t, sub if isinstance(sub, dict) else {})
            t = members.get(part)
            sub = sub.get(part, {}) if isinstance(sub, dict) else {}
        return t

    def keys_under(self, command: str, prefix: str, typed: Optional[dict[str, Any]] = None) -> list[str]:
        """Argument keys to offer for a partially typed key: ``file.`` -> ``file.driver``, ``file.filename``, ...

        Object-typed members are offered with a trailing dot so the user can go deeper.
        """
        typed = typed or {}
        head, _, _ = prefix.rpartition(".")
        if head:
            t = self.resolve(command, head, typed)
            sub: Any = typed
            for part in head.split("."):
                sub = sub.get(part, {}) if isinstance(sub, dict) else {}
            members = self._members(t, sub if isinstance(sub, dict) else {}) if t else {}
            base = head + "."
        else:
            t = self.command_arg_type(command)
            members = self._members(t, typed) if t else {}
            base = ""
        out = []
        for name, mt in sorted(members.items()):
            key = base + name
            if self._is_object(mt) and not self._has_scalar(mt):
                out.append(key + ".")
            else:
                out.append(key + "=")
                if self._is_object(mt):
                    out.append(key + ".")
        return [k for k in out if k.startswith(prefix)]

    def _is_object(self, type_name: str) -> bool:
        ent = self.entities.get(type_name, {})
        if ent.get("meta-type") == "object":
            return True
        if ent.get("meta-type") == "alternate":
            return any(self._is_object(m["type"]) for m in ent.get("members", []))
        return False

    def _has_scalar(self, type_name: str) -> bool:
        ent = self.entities.get(type_name, {})
        if ent.get("meta-type") == "alternate":
            return any(not self._is_object(m["type"]) for m in ent.get("members", []))
        return ent.get("meta-type") != "object"

    def values_of(self, type_name: Optional[str]) -> list[str]:
        """Literal values a type takes: enum values, true/false (also inside alternates)."""
        if type_name is None:
            return []
        ent = self.entities.get(type_name, {})
        mt = ent.get("meta-type")
        if mt == "enum":
            vals = ent.get("values") or [m["name"] for m in ent.get("members", [])]
            return [str(v) for v in vals]
        if (mt == "builtin" and ent.get("json-type") == "boolean") or type_name == "bool":
            return ["true", "false"]
        if mt == "alternate":
            out: list[str] = []
            for m in ent.get("members", []):
                for v in self.values_of(m["type"]):
                    if v not in out:
                        out.append(v)
            return out
        return []


@dataclass
class CompletionData:
    """What the completer knows: the schema plus live names fetched from QEMU."""

    schema: Optional[SchemaIndex] = None
    trace_events: list[str] = field(default_factory=list)
    node_names: list[str] = field(default_factory=list)
    qcow2_nodes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    hmp_commands: list[str] = field(default_factory=list)
    hmp_info: list[str] = field(default_factory=list)  # HMP "info" sub-commands

    async def load(self, session: Any) -> None:
        """Fetch schema and names (each failure only leaves that list empty)."""
        from qemu_ext.qmp.errors import QmpCommandError

        try:
            self.schema = SchemaIndex.from_schema(await session.execute("query-qmp-schema"))
        except QmpCommandError:
            cmds = await session.execute("query-commands")
            self.schema = SchemaIndex({}, sorted(c["name"] for c in cmds))
        try:
            evs = await session.execute("trace-event-get-state", {"name": "*"})
            self.trace_events = sorted(e["name"] for e in evs)
        except QmpCommandError:
            self.trace_events = []
        await self.refresh_names(session)

    async def refresh_names(self, session: Any) -> None:
        from qemu_ext.qmp.errors import QmpCommandError

        try:
            nodes = await session.execute("query-named-block-nodes", {"flat": True})
        except QmpCommandError:
            nodes = []
        self.node_names = sorted({n["node-name"] for n in nodes if n.get("node-name")})
        self.qcow2_nodes = sorted({n["node-name"] for n in nodes if n.get("drv") == "qcow2"})
        try:
            blocks = await session.execute("query-block")
        except QmpCommandError:
            blocks = []
        devs: set[str] = set()
        for b in blocks:
            for k in ("device", "qdev"):
                if b.get(k):
                    devs.add(str(b[k]))
        self.devices = sorted(devs)

    def names_for_arg(self, command: str, key: str) -> list[str]:
        last = key.rsplit(".", 1)[-1]
        if command.startswith("trace-event-") and last == "name":
            return self.trace_events
        if last == "device" or (last == "id" and command.startswith("device")):
            return sorted(set(self.devices) | set(self.node_names))
        if last == "node-name":  # a new name when adding, an existing one otherwise
            return [] if command.endswith("-add") else self.node_names
        if _is_node_arg(last) or last in ("file", "backing", "data-file", "base", "top"):
            return self.node_names
        return []

    def complete(self, text: str, hmp: bool = False) -> list[str]:
        """Candidates for the last word of ``text`` (the text before the cursor)."""
        return complete_line(self, text, hmp)


def _typed_args(tokens: list[str]) -> dict[str, Any]:
    from qemu_ext.qmp.parse import ParseError, parse_args

    good = [t for t in tokens if "=" in t]
    try:
        return parse_args(good)
    except ParseError:
        return {}


def complete_line(data: CompletionData, text: str, hmp: bool = False) -> list[str]:
    tokens = tokenize(text)
    ends_with_space = not text or text[-1].isspace()
    word = "" if ends_with_space else (tokens[-1] if tokens else "")
    before = tokens if ends_with_space else tokens[:-1]
    if hmp and not (before[:1] and before[0].startswith("/")) and not word.startswith("/"):
        if not before:
            return [c for c in data.hmp_commands if c.startswith(word)]
        if before == ["info"]:
            return [c for c in data.hmp_info if c.startswith(word)]
        return []
    # built-ins
    if (before and before[0].startswith("/")) or (not before and word.startswith("/")):
        if not before:
            return [w for w in BUILTIN_WORDS if w.startswith(word)]
        return [c for c in _complete_builtin(data, before, word) if c.startswith(word)]
    schema = data.schema
    if schema is None:
        return []
    if not before:
        cands = [*schema.commands, "transaction("]
        return [c for c in cands if c.startswith(word)]
    command = before[0]
    typed = _typed_args(before[1:])
    if command == "transaction(" or command == "transaction":
        return []
    if "=" in word:
        key, _, partial = word.partition("=")
        t = schema.resolve(command, key, typed)
        vals = schema.values_of(t) + data.names_for_arg(command, key)
        return [f"{key}={v}" for v in _uniq(vals) if v.startswith(partial)]
    used = set()
    for tok in before[1:]:
        used.add(tok.partition("=")[0])
    return [k for k in schema.keys_under(command, word, typed) if k.rstrip("=") not in used]


def _complete_builtin(data: CompletionData, before: list[str], word: str) -> list[str]:
    name = before[0]
    rest = before[1:]
    if name in ("/trace", "/trace-file", "/mtree", "/stats") and not rest:
        return BUILTIN_WORDS.get(name, [])
    if name == "/trace" and len(rest) == 1 and rest[0] in ("list", "on", "off", "capture"):
        return data.trace_events
    if name == "/l2cache" and not rest:
        return data.qcow2_nodes
    if name == "/mtree" and rest[:1] == ["lookup"] and len(rest) == 2:
        return ["io", "memory"]
    if name == "/stats":
        return ["vm", "vcpu", "--watch"]
    return []


def _uniq(items: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for i in items:
        if i not in seen:
            seen.add(i)
            yield i


class ShellCompleter(Completer):
    """prompt-toolkit adapter over :func:`complete_line`."""

    def __init__(self, data: CompletionData, hmp: bool = False) -> None:
        self.data = data
        self.hmp = hmp

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        tokens = tokenize(text)
        word = "" if (not text or text[-1].isspace() or not tokens) else tokens[-1]
        for cand in complete_line(self.data, text, self.hmp):
            yield Completion(cand, start_position=-len(word))
