"""Completion from QEMU's own schema (query-qmp-schema), live names, the built-ins' parsers and HMP's help.

``CompletionData`` holds the schema and the live lists (trace events, node names, drive ids,
block-device ids, -device ids, jobs, HMP commands); ``complete_items`` returns (candidate, meta)
pairs for the word under the cursor; ``ShellCompleter`` is the prompt-toolkit adapter.

Values are offered only where the argument accepts them (issue: ``device_del id=`` offered node
names that QEMU rejects): :data:`VALUE_SOURCES` names, per command and argument, which live list
holds valid values; enum and boolean values come from the schema; elsewhere nothing is offered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Optional

from qemu_ext.qmp.parse import tokenize
from qemu_ext.qmp.schema import SchemaIndex

# (command glob, argument name (last dotted part), source); the first match wins. Checked on 7.2 and 10.0:
# block_resize device= takes a drive id (blk_by_name), node-name= any node; device_del id= a -device id
# or QOM path of a hotpluggable device (qdev_device_del); eject/…-tray id= the block device's qdev
# id or QOM path (query-block "qdev"); block jobs are named by their job id.
VALUE_SOURCES: list[tuple[str, str, str]] = [
    ("trace-event-*", "name", "trace-events"),
    ("block-job-*", "device", "jobs"),
    ("job-*", "id", "jobs"),
    ("device_del", "id", "peripherals"),
    ("block_resize", "device", "drives"),
    ("block_set_io_throttle", "device", "drives"),
    ("block_set_io_throttle", "id", "block-devices"),
    ("eject", "device", "drives"),
    ("eject", "id", "block-devices"),
    ("blockdev-*-tray", "device", "drives"),
    ("blockdev-*-tray", "id", "block-devices"),
    ("blockdev-*-medium", "device", "drives"),
    ("blockdev-*-medium", "id", "block-devices"),
    ("blockdev-change-medium", "device", "drives"),
    ("blockdev-change-medium", "id", "block-devices"),
    ("block-stream", "device", "drives+nodes"),
    ("block-commit", "device", "drives+nodes"),
    ("drive-mirror", "device", "drives+nodes"),
    ("blockdev-mirror", "device", "drives+nodes"),
    ("drive-backup", "device", "drives+nodes"),
    ("blockdev-backup", "device", "drives+nodes"),
    ("block-dirty-bitmap-*", "node", "drives+nodes"),
    ("*-add", "node-name", "none"),  # a new name
    ("*", "node-name", "nodes"),
    ("*", "node", "nodes"),
    ("*", "top-node", "nodes"),
    ("*", "base-node", "nodes"),
    ("*", "overlay", "nodes"),
    ("blockdev-*", "target", "nodes"),
    ("blockdev-add", "file", "nodes"),
    ("blockdev-add", "backing", "nodes"),
    ("blockdev-add", "data-file", "nodes"),
]


@dataclass
class CompletionData:
    """What the completer knows: the schema plus live names fetched from QEMU."""

    schema: Optional[SchemaIndex] = None
    trace_events: list[str] = field(default_factory=list)
    node_names: list[str] = field(default_factory=list)
    qcow2_nodes: list[str] = field(default_factory=list)
    drives: list[str] = field(default_factory=list)  # BlockBackend names (-drive id=)
    block_devices: list[str] = field(default_factory=list)  # qdev id / QOM path of block devices
    peripherals: list[str] = field(default_factory=list)  # -device id= (qom-list /machine/peripheral)
    jobs: list[str] = field(default_factory=list)
    hmp_commands: list[str] = field(default_factory=list)
    hmp_info: list[str] = field(default_factory=list)  # HMP "info" sub-commands
    builtin_completer: Optional[Callable[[CompletionData, list[str], str], list[str]]] = None

    async def load(self, session: Any, hmp: bool = True) -> None:
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
        if hmp:
            await self.load_hmp(session)

    async def load_hmp(self, session: Any) -> None:
        from qemu_ext.qmp.errors import QmpCommandError

        try:
            self.hmp_commands = hmp_words(await session.hmp("help"))
            self.hmp_info = [w.split(" ", 1)[-1] for w in hmp_words(await session.hmp("help info"), 2)]
        except QmpCommandError:
            pass

    async def refresh_names(self, session: Any) -> None:
        from qemu_ext.qmp.errors import QmpCommandError

        async def ask(cmd: str, args: Optional[dict[str, Any]] = None) -> list[Any]:
            try:
                r = await session.execute(cmd, args)
            except QmpCommandError:
                return []
            return r if isinstance(r, list) else []

        nodes = await ask("query-named-block-nodes", {"flat": True})
        self.node_names = sorted({n["node-name"] for n in nodes if n.get("node-name")})
        self.qcow2_nodes = sorted({n["node-name"] for n in nodes if n.get("drv") == "qcow2" and n.get("node-name")})
        blocks = await ask("query-block")
        self.drives = sorted({str(b["device"]) for b in blocks if b.get("device")})
        self.block_devices = sorted({str(b["qdev"]) for b in blocks if b.get("qdev")})
        self.peripherals = sorted(p["name"] for p in await ask("qom-list", {"path": "/machine/peripheral"})
                                  if str(p.get("type", "")).startswith("child<"))
        self.jobs = sorted({str(j["id"]) for j in await ask("query-jobs") if j.get("id")})

    def source(self, name: str) -> list[str]:
        return {
            "trace-events": self.trace_events,
            "nodes": self.node_names,
            "drives": self.drives,
            "drives+nodes": sorted(set(self.drives) | set(self.node_names)),
            "block-devices": self.block_devices,
            "peripherals": self.peripherals,
            "jobs": self.jobs,
        }.get(name, [])

    def names_for_arg(self, command: str, key: str) -> list[str]:
        """Live values the argument ``key`` of ``command`` accepts (VALUE_SOURCES), [] when none is known."""
        import fnmatch

        last = key.rsplit(".", 1)[-1]
        for pattern, arg, src in VALUE_SOURCES:
            if arg == last and fnmatch.fnmatchcase(command, pattern):
                return self.source(src)
        return []

    def complete(self, text: str, hmp: bool = False, transaction: bool = False) -> list[str]:
        """Candidates for the last word of ``text`` (the text before the cursor)."""
        return [c for c, _ in complete_items(self, text, hmp, transaction)]


def hmp_words(help_text: str, n: int = 1) -> list[str]:
    """Command names from HMP ``help`` (first ``n`` words of each entry; continuation lines are indented)."""
    out = set()
    for ln in help_text.splitlines():
        if not ln.strip() or ln[0].isspace():
            continue
        words = ln.split(" -- ", 1)[0].split()
        if len(words) >= n:
            out.add(" ".join(w.split("|")[0] for w in words[:n]))
    return sorted(out)


def _typed_args(tokens: list[str]) -> dict[str, Any]:
    from qemu_ext.qmp.parse import ParseError, parse_args

    try:
        return parse_args([t for t in tokens if "=" in t])
    except ParseError:
        return {}


Item = tuple[str, str]  # (candidate, meta shown in the menu)


def _split(text: str) -> tuple[list[str], str]:
    tokens = tokenize(text)
    if not text or text[-1].isspace():
        return tokens, ""
    return tokens[:-1], (tokens[-1] if tokens else "")


def complete_items(data: CompletionData, text: str, hmp: bool = False, transaction: bool = False) -> list[Item]:
    before, word = _split(text)
    if (before and before[0].startswith("/")) or (not before and word.startswith("/") and not transaction):
        comp = data.builtin_completer
        return [(c, "") for c in (comp(data, before, word) if comp else [])]
    if transaction:
        return _complete_transaction(data, before, word)
    if hmp:
        return [(c, "") for c in complete_hmp(data, before, word)]
    schema = data.schema
    if schema is None:
        return []
    if not before:
        cands = [*schema.commands, "transaction(", "help"]
        return [(c, "") for c in cands if c.startswith(word)]
    command = before[0]
    if command in ("transaction(", "transaction"):
        return _complete_transaction(data, before[1:], word)
    return _complete_args(data, command, schema.command_arg_type(command), before[1:], word)


def _complete_args(data: CompletionData, command: str, arg_type: Optional[str], before: list[str],
                   word: str) -> list[Item]:
    schema = data.schema
    assert schema is not None
    typed = _typed_args(before)
    if "=" in word:
        key, _, partial = word.partition("=")
        t = _resolve(schema, arg_type, key, typed)
        vals = schema.values_of(t) + data.names_for_arg(command, key)
        return [(f"{key}={v}", "") for v in _uniq(vals) if v.startswith(partial)]
    used = {tok.partition("=")[0] for tok in before}
    out = []
    for k in _keys_under(schema, arg_type, word, typed):
        if k.rstrip("=") in used:
            continue
        m = _member(schema, arg_type, k.rstrip("=."), typed)
        meta = ""
        if m is not None:
            meta = schema.describe(m["type"]) + ("" if "default" in m else ", required")
        out.append((k, meta))
    return out


def _resolve(schema: SchemaIndex, arg_type: Optional[str], dotted: str, typed: dict[str, Any]) -> Optional[str]:
    t = arg_type
    sub: Any = typed
    for part in dotted.split("."):
        if t is None:
            return None
        m = schema.members(t, sub if isinstance(sub, dict) else {}).get(part)
        t = m["type"] if m else None
        sub = sub.get(part, {}) if isinstance(sub, dict) else {}
    return t


def _member(schema: SchemaIndex, arg_type: Optional[str], dotted: str, typed: dict[str, Any]) -> Optional[dict]:
    head, _, last = dotted.rpartition(".")
    t = _resolve(schema, arg_type, head, typed) if head else arg_type
    sub: Any = typed
    for part in head.split(".") if head else []:
        sub = sub.get(part, {}) if isinstance(sub, dict) else {}
    return schema.members(t, sub if isinstance(sub, dict) else {}).get(last)


def _keys_under(schema: SchemaIndex, arg_type: Optional[str], prefix: str, typed: dict[str, Any]) -> list[str]:
    head, _, _ = prefix.rpartition(".")
    t = _resolve(schema, arg_type, head, typed) if head else arg_type
    sub: Any = typed
    for part in head.split(".") if head else []:
        sub = sub.get(part, {}) if isinstance(sub, dict) else {}
    members = schema.members(t, sub if isinstance(sub, dict) else {}) if t else {}
    base = head + "." if head else ""
    out = []
    for name, m in sorted(members.items()):
        key = base + name
        mt = m["type"]
        if schema.is_object(mt) and not schema._has_scalar(mt):
            out.append(key + ".")
        else:
            out.append(key + "=")
            if schema.is_object(mt):
                out.append(key + ".")
    return [k for k in out if k.startswith(prefix)]


def transaction_actions(schema: Optional[SchemaIndex]) -> dict[str, Optional[str]]:
    """Action type -> the type of its ``data`` (TransactionAction's variants), from the schema."""
    if schema is None or not schema.entities:
        return {}
    args = schema.members(schema.command_arg_type("transaction"))
    arr = schema.entities.get(args.get("actions", {}).get("type", ""), {})
    union = arr.get("element-type")
    out: dict[str, Optional[str]] = {}
    ent = schema.entities.get(union or "", {})
    for v in ent.get("variants", []):
        data = schema.members(v["type"]).get("data")
        out[v["case"]] = data["type"] if data else None
    return out


def _complete_transaction(data: CompletionData, before: list[str], word: str) -> list[Item]:
    """Inside ``transaction(``: action types (abort included) and ``)``, then the action's data members."""
    actions = transaction_actions(data.schema)
    if not before:
        return [(c, "ends the transaction" if c == ")" else "") for c in [*sorted(actions), ")"] if c.startswith(word)]
    if data.schema is None or before[0] not in actions:
        return []
    items = _complete_args(data, before[0], actions[before[0]], before[1:], word)
    return items + ([(")", "ends the transaction")] if ")".startswith(word) else [])


def complete_hmp(data: CompletionData, before: list[str], word: str) -> list[str]:
    """HMP lines: command names, ``info`` topics, ``help CMD``, trace events, drives/nodes for qemu-io,
    device ids for device_del."""
    if not before:
        return [c for c in data.hmp_commands if c.startswith(word)]
    cmd, args = before[0], before[1:]
    cands: list[str] = []
    if cmd == "info" and not args:
        cands = data.hmp_info
    elif cmd in ("help", "?") and not args:
        cands = data.hmp_commands
    elif cmd == "trace-event":
        cands = data.trace_events if not args else (["on", "off"] if len(args) == 1 else [])
    elif cmd == "qemu-io" and not [a for a in args if a != "-d"]:
        cands = data.block_devices if "-d" in args else sorted(set(data.drives) | set(data.node_names))
    elif cmd == "device_del" and not args:
        cands = data.peripherals
    elif cmd in ("drive_del", "eject", "block_resize") and not args:
        cands = data.drives
    return [c for c in cands if c.startswith(word)]


def _uniq(items: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for i in items:
        if i not in seen:
            seen.add(i)
            yield i


class ShellCompleter:
    """prompt-toolkit adapter over :func:`complete_items`; ``mode()`` says (hmp, in a transaction);
    ``ready()`` is awaited first (the schema loading in the background: Tab right after the prompt
    appears waits for it instead of offering nothing)."""

    def __new__(cls, data: CompletionData, mode: Callable[[], tuple[bool, bool]],
                ready: Optional[Callable[[], Any]] = None) -> Any:
        from prompt_toolkit.completion import CompleteEvent, Completer, Completion
        from prompt_toolkit.document import Document

        class _Completer(Completer):
            def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
                text = document.text_before_cursor
                _before, word = _split(text)
                hmp, trans = mode()
                for cand, meta in complete_items(data, text, hmp, trans):
                    yield Completion(cand, start_position=-len(word), display_meta=meta or None)

            async def get_completions_async(self, document: Document,
                                            complete_event: CompleteEvent) -> AsyncIterator[Completion]:
                if ready is not None:
                    await ready()
                for c in self.get_completions(document, complete_event):
                    yield c

        return _Completer()
