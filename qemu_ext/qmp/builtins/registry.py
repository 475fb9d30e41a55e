"""The one registry of the shell's built-ins (pgcli's special commands, the gdb pack's commands):
each built-in is registered once with its name, summary, argparse arguments and handler, and that
one entry drives dispatch, ``/help``, ``/help NAME`` and completion.

    def _args(p: BuiltinParser) -> None:
        p.add_argument("node", nargs="?", help="qcow2 node name").completer = lambda d: d.qcow2_nodes

    @builtin("l2cache", "qcow2 cache settings and the full-coverage l2-cache-size", _args,
             examples=["/l2cache", "/l2cache disk0"])
    async def l2cache(ctx: Context, args: argparse.Namespace) -> Result: ...

A handler returns a :class:`Result` (JSON-ready data plus its text) that the shell prints (as JSON
with ``/json``, ``--json`` or ``--output=json``), or None when it printed by itself.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

from qemu_ext.errors import UsageError  # a built-in's arguments are wrong: exit 2, as every usage error


class HelpShown(Exception):
    """``/NAME --help``: the parser's help text, to print instead of running."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100, max_help_position=32)


class BuiltinParser(argparse.ArgumentParser):
    """argparse that never exits: errors are UsageError with the usage line."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("add_help", False)
        kw.setdefault("allow_abbrev", False)
        kw.setdefault("formatter_class", _Formatter)
        super().__init__(*a, **kw)

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (usage: {self.format_usage().strip()[7:]})")

    def exit(self, status: int = 0, message: Optional[str] = None) -> Any:  # type: ignore[override]
        raise UsageError(message or f"{self.prog}: bad arguments")


class Context(Protocol):
    """What a handler may use (the shell implements it)."""

    session: Any  # qemu_ext.qmp.client.QmpSession
    completion: Any  # qemu_ext.qmp.completion.CompletionData
    blockdev_options: dict[str, dict[str, Any]]
    as_json: bool  # the result is printed as JSON
    interactive: bool  # a person at a terminal (refresh in place, pager, questions)
    raw_args: str  # the line after /NAME as typed (quotes kept: /hmp)

    def out(self, text: str) -> None: ...
    def err(self, text: str) -> None: ...
    def width(self) -> int: ...
    def emit(self, result: Result) -> None: ...
    async def schema(self) -> Any: ...  # qemu_ext.qmp.schema.SchemaIndex, or None
    async def hmp_commands(self) -> list[str]: ...
    async def run_hmp(self, line: str) -> str: ...
    async def run_builtin(self, name: str, args: list[str], as_json: bool = False, raw: str = "") -> None: ...


@dataclass
class Result:
    data: Any  # JSON-ready (kebab-case keys)
    text: str = ""


Handler = Callable[[Context, argparse.Namespace], Awaitable[Optional[Result]]]
Completer = Callable[[Any], list[str]]  # CompletionData -> candidates


@dataclass
class Builtin:
    name: str
    summary: str
    parser: BuiltinParser
    handler: Handler
    aliases: tuple[str, ...] = ()
    examples: list[str] = field(default_factory=list)

    def help(self) -> str:
        text = self.parser.format_help().rstrip()
        if self.examples:
            text += "\n\nexamples:\n" + "\n".join(f"  {e}" for e in self.examples)
        return text


REGISTRY: dict[str, Builtin] = {}  # name (and aliases) -> Builtin


def builtin(name: str, summary: str, arguments: Optional[Callable[[BuiltinParser], None]] = None,
            aliases: tuple[str, ...] = (), examples: Optional[list[str]] = None) -> Callable[[Handler], Handler]:
    """Register a built-in ``/name`` (see the module docstring). Every built-in takes ``--help``; those
    that return data take ``--json``."""

    def deco(fn: Handler) -> Handler:
        p = BuiltinParser(prog=f"/{name}", description=summary)
        if arguments is not None:
            arguments(p)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--help", "-h", action="store_true", help="show this help")
        b = Builtin(name, summary, p, fn, aliases, list(examples or []))
        for n in (name, *aliases):
            if n in REGISTRY:
                raise RuntimeError(f"built-in /{n} registered twice")
            REGISTRY[n] = b
        return fn

    return deco


def commands() -> list[Builtin]:
    """Each built-in once, in name order."""
    seen: dict[str, Builtin] = {}
    for b in REGISTRY.values():
        seen.setdefault(b.name, b)
    return sorted(seen.values(), key=lambda b: b.name)


def lookup(name: str) -> Builtin:
    b = REGISTRY.get(name.lstrip("/"))
    if b is None:
        import difflib

        near = difflib.get_close_matches(name.lstrip("/"), list(REGISTRY), n=3)
        hint = f"; did you mean {', '.join('/' + n for n in near)}?" if near else "; /help lists them"
        raise UsageError(f"unknown built-in /{name.lstrip('/')}{hint}")
    return b


def parse(b: Builtin, argv: list[str]) -> tuple[argparse.Namespace, bool]:
    """The handler's arguments and whether ``--json`` was given (anywhere on the line, like ``--help``)."""
    if "--help" in argv or "-h" in argv:
        raise HelpShown(_help_for(b, [a for a in argv if a not in ("--help", "-h")]))
    as_json = "--json" in argv
    return b.parser.parse_args([a for a in argv if a != "--json"]), as_json


def _help_for(b: Builtin, argv: list[str]) -> str:
    """``/trace capture --help`` is the help of the capture sub-command."""
    for a in b.parser._actions:
        if isinstance(a, argparse._SubParsersAction) and a.choices:
            for w in argv:
                if w in a.choices:
                    return a.choices[w].format_help().rstrip()
    return b.help()


def index() -> str:
    """One line per built-in, for /help."""
    rows = []
    for b in commands():
        usage = " ".join(b.parser.format_usage().split()[1:])
        usage = usage.replace(" [--json] [--help]", "")
        rows.append((usage, b.summary))
    w = min(max(len(u) for u, _ in rows), 44)
    out = []
    for u, s in rows:
        out.append(f"  {u:<{w}}  {s}" if len(u) <= w else f"  {u}\n  {'':<{w}}  {s}")
    return "\n".join(out)


# -- completion from the parsers -----------------------------------------------------------------------


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0 and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                                          argparse._StoreConstAction, argparse._CountAction))


def _values(action: argparse.Action, data: Any) -> list[str]:
    comp = getattr(action, "completer", None)
    if comp is not None:
        return list(comp(data))
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return [str(c) for c in action.choices]
    return []


def complete_args(parser: argparse.ArgumentParser, before: list[str], word: str, data: Any) -> list[str]:
    """Candidates for ``word`` after the argument words ``before``, from the parser's own arguments."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    positionals = [a for a in parser._actions if not a.option_strings]
    used: set[argparse.Action] = set()
    pos_i = 0
    pos_filled = 0  # values taken by positionals[pos_i] so far
    i = 0
    while i < len(before):
        tok = before[i]
        if tok in options:
            act = options[tok]
            used.add(act)
            if _takes_value(act):
                i += 1  # its value
            i += 1
            continue
        if pos_i < len(positionals):
            act = positionals[pos_i]
            if isinstance(act, argparse._SubParsersAction):
                sub = act.choices.get(tok) if act.choices else None
                if sub is None:
                    return []
                return complete_args(sub, before[i + 1:], word, data)
            if act.nargs == argparse.REMAINDER:
                comp = getattr(act, "completer", None)
                return list(comp(data, before[i:], word)) if comp else []
            pos_filled += 1
            if act.nargs in (None, "?") or (isinstance(act.nargs, int) and pos_filled >= act.nargs):
                pos_i, pos_filled = pos_i + 1, 0
        i += 1
    # the word completes the value of an option given just before it
    if before and before[-1] in options and _takes_value(options[before[-1]]):
        return [c for c in _values(options[before[-1]], data) if c.startswith(word)]
    cands: list[str] = []
    if pos_i < len(positionals):
        act = positionals[pos_i]
        if isinstance(act, argparse._SubParsersAction):
            cands += list(act.choices or {})
        elif act.nargs == argparse.REMAINDER:
            comp = getattr(act, "completer", None)
            return list(comp(data, [], word)) if comp else []
        else:
            cands += _values(act, data)
    if word.startswith("-") or not cands:
        cands += [s for a in parser._actions if a not in used and a.dest not in ("help",)
                  for s in a.option_strings if s.startswith("--")]
    return [c for c in cands if c.startswith(word)]


def complete(data: Any, before: list[str], word: str) -> list[str]:
    """Completion of a built-in line: ``before`` are the words before ``word`` (the first is /NAME)."""
    if not before:
        return [f"/{n}" for n in sorted(REGISTRY) if f"/{n}".startswith(word)]
    b = REGISTRY.get(before[0].lstrip("/"))
    if b is None:
        return []
    return complete_args(b.parser, before[1:], word, data)
