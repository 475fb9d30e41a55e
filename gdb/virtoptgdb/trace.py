"""`virtopt trace list|enable|disable PATTERN`: QEMU's trace-event states through memory only."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.introspect import render
from qemu_ext.introspect import trace as trace_view
from qemu_ext.introspect.target import IntrospectError

from . import command, utils


def _event_names() -> list[str]:
    return [e.name for e in trace_view.events(utils.target())]


class TracePrefix(command.VirtoptCommand):
    name = "trace"
    summary = "List, enable and disable QEMU trace events by writing memory (no debug info needed)."
    epilog = ("examples:\n  virtopt trace list 'qcow2_cache_*'\n  virtopt trace enable qcow2_cache_get\n"
              "  virtopt trace disable 'qcow2_*'\n  virtopt trace list --enabled --json")
    prefix = True
    json_option = False

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("rest", nargs="*", help="list | enable | disable, then patterns")

    def collect(self, args: argparse.Namespace) -> Any:
        what = " ".join(args.rest)
        raise IntrospectError(f"unknown trace sub-command {what!r}: use virtopt trace list|enable|disable PATTERN"
                              if what else "say what to do: virtopt trace list|enable|disable PATTERN")


class TraceList(command.VirtoptCommand):
    name = "trace list"
    summary = "Trace events and their state (enabled/disabled/unavailable), as QMP trace-event-get-state."
    epilog = "examples:\n  virtopt trace list 'qcow2_cache_*'\n  virtopt trace list --enabled"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("patterns", nargs="*", metavar="PATTERN",
                       help="event name or glob (*, ?), as QMP trace-event-get-state takes")
        p.add_argument("--enabled", action="store_true", help="only the enabled events")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"patterns": args.patterns, "enabled_only": args.enabled}

    def candidates(self) -> list[str]:
        return _event_names()

    def render(self, data: Any, args: argparse.Namespace) -> str:
        return render.trace_list(data)


class _TraceToggle(command.VirtoptCommand):
    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("patterns", nargs="+", metavar="PATTERN",
                       help="event name or glob (*, ?), as QMP trace-event-set-state takes")

    def view_args(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"patterns": args.patterns}

    def candidates(self) -> list[str]:
        return _event_names()

    def render(self, data: Any, args: argparse.Namespace) -> str:
        return render.trace_toggle(data)


class TraceEnable(_TraceToggle):
    name = "trace enable"
    summary = "Enable trace events (what QMP trace-event-set-state does), by writing QEMU's memory."
    epilog = "examples:\n  virtopt trace enable qcow2_cache_get\n  virtopt trace enable 'qcow2_cache_*' --json"


class TraceDisable(_TraceToggle):
    name = "trace disable"
    summary = "Disable trace events, by writing QEMU's memory."
    epilog = "examples:\n  virtopt trace disable 'qcow2_*'"


def register() -> None:
    TracePrefix()
    TraceList()
    TraceEnable()
    TraceDisable()
