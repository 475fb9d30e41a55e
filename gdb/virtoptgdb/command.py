"""The command machinery of the virtopt gdb pack (like Linux's scripts/gdb command modules):
the ``virtopt`` prefix, the command base with argparse parsing and ``--json``, the parameters,
and the one place where errors become one gdb error line.

A command names the view it renders (qemu_ext.introspect.views): the view's requirements decide
whether it runs here, the view collects, the command only renders (qemu_ext.introspect.render).
"""

from __future__ import annotations

import argparse
import json
import os
import traceback
from typing import Any, Optional

import gdb  # type: ignore[import-not-found]
from qemu_ext.errors import VirtoptError
from qemu_ext.gdbmi.driver import JSON_MARKER
from qemu_ext.introspect import common, views
from qemu_ext.introspect.target import IntrospectError

from . import utils

# ---------------------------------------------------------------- parameters


class DebugParameter(gdb.Parameter):
    """Show Python tracebacks of virtopt commands (off by default)."""

    set_doc = "Set whether virtopt commands show Python tracebacks."
    show_doc = "Show whether virtopt commands show Python tracebacks."

    def __init__(self) -> None:
        super().__init__("virtopt-debug", gdb.COMMAND_DATA, gdb.PARAM_BOOLEAN)
        self.value = bool(os.environ.get("VIRTOPT_DEBUG"))


class NoDebugInfoParameter(gdb.Parameter):
    """Pretend the inferior has no debug info (to check the symbol-only paths on a debug build)."""

    set_doc = "Set whether virtopt ignores QEMU's debug info."
    show_doc = "Show whether virtopt ignores QEMU's debug info."

    def __init__(self) -> None:
        super().__init__("virtopt-ignore-debug-info", gdb.COMMAND_DATA, gdb.PARAM_BOOLEAN)
        self.value = False

    def get_set_string(self) -> str:
        utils.clear_caches()
        return ""


class JsonDirParameter(gdb.Parameter):
    """Directory where --json output goes as files (set by virtopt's pygdbmi driver: large JSON
    through gdb/MI console records is slow). Empty: --json prints to the console."""

    set_doc = "Set the directory virtopt writes --json output to (empty: the console)."
    show_doc = "Show the directory virtopt writes --json output to."

    def __init__(self) -> None:
        super().__init__("virtopt-json-dir", gdb.COMMAND_DATA, gdb.PARAM_OPTIONAL_FILENAME)
        self.value = ""


PARAMS: dict[str, Any] = {}
_json_seq = [0]


def emit_json(data: Any) -> None:
    text = json.dumps(data, indent=4)
    d = PARAMS["json-dir"].value if "json-dir" in PARAMS else ""
    if d and os.path.isdir(d):
        _json_seq[0] += 1
        path = os.path.join(d, f"{os.getpid()}-{_json_seq[0]}.json")
        with open(path, "w") as f:
            f.write(text + "\n")
        gdb.write(f"{JSON_MARKER}{path}\n")
    else:
        gdb.write(text + "\n")


def debug_enabled() -> bool:
    return bool("debug" in PARAMS and PARAMS["debug"].value)


def init() -> None:
    if PARAMS:
        return
    PARAMS["debug"] = DebugParameter()
    PARAMS["json-dir"] = JsonDirParameter()
    PARAMS["ignore-debug-info"] = NoDebugInfoParameter()
    utils.connect_events(lambda: bool(PARAMS["ignore-debug-info"].value))


# ---------------------------------------------------------------- commands


class _ParserExit(Exception):
    pass


class ArgParser(argparse.ArgumentParser):
    """argparse that reports through gdb: errors are GdbErrors, --help does not exit gdb."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise gdb.GdbError(f"{self.prog}: {message} (see: help {self.prog})")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message:
            gdb.write(message)
        raise _ParserExit()

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            gdb.write(message)


class VirtoptPrefix(gdb.Command):
    """virtopt: QEMU debugging commands that only read (and, for trace, write) QEMU's memory.

They never call functions in QEMU, so they are safe on a live VM and work where gdb
cannot call into the inferior, and on core files (gdb QEMU CORE). Every command takes --json.
`virtopt inspect` runs the same views without stopping QEMU (drgn).
"""

    def __init__(self, name: str = "virtopt") -> None:
        # every command is a view of qemu_ext.introspect (views.NAMES: one list for both front doors)
        self.__doc__ = (type(self).__doc__ or "") + "\n" + commands_line() + "\n`help virtopt COMMAND` for each."
        super().__init__(name, gdb.COMMAND_DATA, gdb.COMPLETE_NONE, True)


def commands_line(width: int = 92) -> str:
    """"Commands: info, threads, ..., trace list|enable|disable, ..." wrapped, from views.NAMES."""
    words: list[str] = []
    for name in views.NAMES:
        head, _, sub = name.partition(" ")
        if head == "trace" and sub:
            if "trace" not in words:
                words.append("trace")
            continue
        words.append(name)
    trace_subs = "|".join(n.split(" ", 1)[1] for n in views.NAMES if n.startswith("trace "))
    words = [f"trace {trace_subs}" if w == "trace" else w for w in words]
    lines, cur = [], "Commands:"
    for i, w in enumerate(words):
        item = f" {w}" + ("," if i < len(words) - 1 else ".")
        if len(cur) + len(item) > width:
            lines.append(cur)
            cur = item.lstrip()
        else:
            cur += item
    lines.append(cur)
    return "\n".join(lines)


COMMANDS: list[VirtoptCommand] = []
PREFIX: list[VirtoptPrefix] = []


class VirtoptCommand(gdb.Command):
    """Base class: subclasses set name (and view when it differs), summary, epilog; implement
    add_arguments, view_args and render."""

    name = ""
    view: Optional[str] = None  # the qemu_ext.introspect view rendered (default: name)
    summary = ""
    epilog = ""
    prefix = False
    json_option = True

    def __init__(self) -> None:
        self.__doc__ = self._doc()
        # no completer class: gdb then asks complete() (options, event names, address spaces, nodes)
        super().__init__("virtopt " + self.name, gdb.COMMAND_DATA, prefix=self.prefix)
        COMMANDS.append(self)

    @property
    def view_name(self) -> str:
        return self.view or self.name

    def availability(self) -> Optional[str]:
        """None when the command can run in this process, else the one-line reason."""
        try:
            common.check(utils.target(), self.view_name)
        except (VirtoptError, IntrospectError) as exc:
            return str(exc)
        return None

    def _doc(self) -> str:
        # gdb shows the first line in `help virtopt`: the summary, then the full argparse help
        return self.summary + "\n\n" + self.parser().format_help().rstrip()

    def parser(self) -> ArgParser:
        p = ArgParser(prog="virtopt " + self.name, description=self.summary, epilog=self.epilog,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(p)
        if self.json_option:
            p.add_argument("--json", action="store_true", help="print the data as JSON")
        return p

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        pass

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {}

    def candidates(self) -> list[str]:
        """Words this command takes besides its options (event names, address spaces, nodes)."""
        return []

    def complete(self, text: str, word: Optional[str]) -> Any:
        """Completion at the gdb prompt: options, then what candidates() offers. Never raises."""
        word = word or ""
        # gdb splits words at characters such as '/' (an address space "I/O"): match the whole
        # last token, answer for the part gdb calls the word
        token = "" if not text or text.endswith(" ") else text.split()[-1]
        lead = token[:len(token) - len(word)] if token.endswith(word) else ""
        try:
            if token.startswith("-"):
                opts = [o for a in self.parser()._actions for o in a.option_strings if o.startswith("--")]
                cands = set(opts)
            else:
                cands = set(self.candidates())
            return sorted(c[len(lead):] for c in cands if c.startswith(token))
        except Exception:  # completion must never break the prompt
            return []

    def collect(self, args: argparse.Namespace) -> Any:
        return views.run(utils.target(), self.view_name, **self.view_args(args))

    def render(self, data: Any, args: argparse.Namespace) -> str:
        return json.dumps(data, indent=4) + "\n"

    def invoke(self, arg: str, from_tty: bool) -> None:
        try:
            args = self.parser().parse_args(gdb.string_to_argv(arg))
        except _ParserExit:
            return
        try:
            data = self.collect(args)
            if getattr(args, "json", False):
                emit_json(data)
            else:
                gdb.write(self.render(data, args))
        except gdb.GdbError:
            raise
        except (VirtoptError, IntrospectError) as exc:
            if debug_enabled():
                traceback.print_exc()
            msg = str(exc)
            if not msg.startswith("virtopt "):
                msg = f"virtopt {self.name}: {msg}"
            raise gdb.GdbError(msg) from None
        except KeyboardInterrupt:
            raise gdb.GdbError(f"virtopt {self.name}: interrupted") from None
        except gdb.MemoryError as exc:
            if debug_enabled():
                traceback.print_exc()
            raise gdb.GdbError(f"virtopt {self.name}: cannot read QEMU's memory: {exc} "
                               "(a dangling pointer, or QEMU's structures differ)") from None
        except gdb.error as exc:
            if debug_enabled():
                traceback.print_exc()
            raise gdb.GdbError(f"virtopt {self.name}: this QEMU's structures differ from what virtopt knows: "
                               f"{exc}") from None
        except Exception as exc:
            if debug_enabled():
                traceback.print_exc()
            raise gdb.GdbError(
                f"virtopt {self.name}: {type(exc).__name__}: {exc} (set virtopt-debug on for the traceback)") from None
