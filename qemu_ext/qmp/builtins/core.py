"""The shell's own built-ins: ``/help [CMD]``, ``/json BUILTIN``, ``/hmp LINE``, ``/quit``."""

from __future__ import annotations

import argparse
import difflib
import textwrap
from typing import Any, Optional

from qemu_ext.qmp.builtins import registry
from qemu_ext.qmp.builtins.registry import BuiltinParser, Context, Result, builtin
from qemu_ext.qmp.errors import NoMatchError
from qemu_ext.qmp.schema import CommandHelp

INPUT_HELP = """\
QMP input (as qmp-shell):
  cmd key=value key.sub=value      values: numbers, true/false, JSON or Python literals, else strings;
                                   checked against QEMU's schema before sending (sizes like 1G for integers)
  transaction( ... )               one action per line, ')' sends them (Tab completes actions and 'abort')
  {"execute": "...", ...}          a raw JSON line
  CMD ?   or   /help CMD           a command's arguments, types and values from QEMU's schema
keys: Tab completes (a second Tab shows the menu, Enter on a menu entry only inserts it), Escape closes
  the menu, Up/Down search the history by the typed prefix, Ctrl-R searches it (Enter runs the line),
  Ctrl-C cancels the line or a running command, Ctrl-D quits. Pasted lines run one after another
  and stop at the first error. quit, system_reset and system_powerdown ask first (--yes does not).
built-ins (/NAME --help for each):"""


def _topics(data: Any) -> list[str]:
    cmds = list(data.schema.commands) if data.schema is not None else []
    return [f"/{b.name}" for b in registry.commands()] + cmds + list(data.hmp_commands)


def _help_args(p: BuiltinParser) -> None:
    p.add_argument("topic", nargs="?", metavar="CMD", help="a built-in, a QMP command or (HMP mode) an HMP command"
                   ).completer = _topics  # type: ignore[attr-defined]


def general_help() -> str:
    return INPUT_HELP + "\n" + registry.index()


def render_command_help(h: CommandHelp) -> str:
    head = f"{h.name}  (returns {h.returns}" + (", out-of-band allowed" if h.allow_oob else "")
    head += (f"; features: {', '.join(h.features)}" if h.features else "") + ")"
    if not h.arguments:
        return head + "\nno arguments"
    lines = [head]
    groups: dict[str, list[Any]] = {}
    for a in h.arguments:
        groups.setdefault(a.variant, []).append(a)
    width = min(max(len(a.name) for a in h.arguments), 32)
    for variant, args in groups.items():
        lines.append(f"arguments when {variant}:" if variant else "arguments:")
        for a in args:
            desc = a.type + (", required" if a.required else "")
            if a.features:
                desc += f" ({', '.join(a.features)})"
            lines.append(f"  {a.name:<{width}}  {desc}")
            if a.values and a.type != "bool":
                vals = textwrap.wrap(" ".join(a.values), 96 - width, break_on_hyphens=False, break_long_words=False)
                lines += [f"  {'':<{width}}    values: {vals[0]}"] + [f"  {'':<{width}}            {v}"
                                                                       for v in vals[1:]]
    return "\n".join(lines)


@builtin("help", "the shell's help; /help CMD: a built-in's, a QMP command's (from the schema) or an HMP command's",
         _help_args, examples=["/help", "/help trace", "/help blockdev-add", "query-stats ?"])
async def help_(ctx: Context, a: argparse.Namespace) -> Result:
    topic: Optional[str] = a.topic
    if not topic:
        return Result({"builtins": [{"name": b.name, "summary": b.summary} for b in registry.commands()]},
                      general_help())
    schema = None if topic.startswith("/") else await ctx.schema()
    if topic.startswith("/") or (topic in registry.REGISTRY and not (schema and schema.has_command(topic))):
        b = registry.lookup(topic)
        return Result({"name": f"/{b.name}", "help": b.help()}, b.help())
    if schema is not None and schema.has_command(topic):
        h = schema.command_help(topic) if schema.entities else None
        if h is None:
            return Result({"name": topic}, f"{topic}: QEMU gave no schema (query-qmp-schema failed): no details")
        return Result(h.to_dict(), render_command_help(h))
    hmp_cmds = await ctx.hmp_commands()
    if topic in hmp_cmds:
        text = (await ctx.session.hmp(f"help {topic}")).rstrip()
        return Result({"name": topic, "hmp": text}, text)
    near = difflib.get_close_matches(topic, [*(schema.commands if schema else []), *registry.REGISTRY, *hmp_cmds], 3)
    raise NoMatchError("command", topic, f"did you mean {', '.join(near)}?" if near else "/help lists the built-ins")


@builtin("quit", "leave the shell (QEMU keeps running)", aliases=("exit",))
async def quit_(ctx: Context, a: argparse.Namespace) -> None:
    raise EOFError


def _complete_json(data: Any, before: list[str], word: str) -> list[str]:
    if not before:
        return [c.lstrip("/") if not word.startswith("/") else c
                for c in registry.complete(data, [], "/" + word.lstrip("/")) if c != "/json"]
    return registry.complete(data, ["/" + before[0].lstrip("/"), *before[1:]], word)


def _json_args(p: BuiltinParser) -> None:
    p.add_argument("line", nargs=argparse.REMAINDER, metavar="BUILTIN ...", help="a built-in and its arguments"
                   ).completer = _complete_json  # type: ignore[attr-defined]


@builtin("json", "run a built-in and print its result as JSON", _json_args,
         examples=["/json stats vm", "/json mtree lookup 0x70", "/json threads"])
async def json_(ctx: Context, a: argparse.Namespace) -> None:
    if not a.line:
        raise registry.UsageError("usage: /json BUILTIN [ARGS...]  (e.g. /json stats vm)")
    await ctx.run_builtin(a.line[0].lstrip("/"), a.line[1:], as_json=True)


def _hmp_args(p: BuiltinParser) -> None:
    from qemu_ext.qmp.completion import complete_hmp

    p.add_argument("line", nargs=argparse.REMAINDER, metavar="HMP-COMMAND ...", help="an HMP command line"
                   ).completer = lambda d, before, word: complete_hmp(d, before, word)  # type: ignore[attr-defined]


@builtin("hmp", "run one HMP command from QMP mode (like virsh qemu-monitor-command --hmp)", _hmp_args,
         examples=["/hmp info mtree -f", '/hmp qemu-io drv0 "read 0 4k"'])
async def hmp(ctx: Context, a: argparse.Namespace) -> Result:
    line = ctx.raw_args.strip()
    if not line:
        raise registry.UsageError("usage: /hmp HMP-COMMAND [ARGS...]  (e.g. /hmp info status)")
    text = await ctx.run_hmp(line)
    return Result({"hmp": line, "return": text}, text.rstrip("\n"))
