"""`virtopt inspect PID|--core CORE [--exe QEMU] VIEW [--json]`: the gdb pack's read-only views
without stopping QEMU (drgn reads the process's memory through procfs), or on a core file."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from qemu_ext.output import add_output_option, print_json

EPILOG = """\
views:
  info                        QEMU version, accelerator, debug info, which views work here
  threads                     threads and their roles (vCPU n, iothread, main loop, ...), BQL holder
  vcpus                       each CPUState: thread, halted/stopped, last KVM exit
  mtree [AS] [--flat]         the memory region tree, or the flat view (info mtree -f)
  mtree lookup ADDR [--as AS] which region answers at a guest physical address
  timers                      armed timers per clock and timer list
  trace list [PATTERN...]     trace events and their state (as QMP trace-event-get-state)
  qcow2 [NODE] [--slices]     live L2 and refcount cache state of each qcow2 node
  coroutines [--pools]        coroutines in flight (tracked, scheduled, parked: what each waits on), the pools
  block [NODE]                the block graph, BlockBackends and devices, throttle groups, queued requests
  waiters                     coroutines parked in CoQueues, CoMutexes, throttle queues, blkdebug breaks
  locks                       BQL holder and waiters, AioContext locks, what each thread is blocked on
  cpustate [CPU]              guest x86 state (RIP, CS/mode, CR0-CR4, EFER, halted) from CPUX86State

examples:
  virtopt inspect 12345 info
  virtopt inspect 12345 threads --json
  virtopt inspect web1 vcpus                  (the VM named web1; a QMP socket or libvirt:DOMAIN too)
  virtopt inspect 12345 mtree --flat
  virtopt inspect 12345 mtree lookup 0xfee00000
  virtopt inspect 12345 mtree lookup 0x70 --as io   (I/O port 0x70: the rtc, as the shell's /mtree lookup)
  virtopt inspect 12345 trace list 'qcow2_cache_*'
  virtopt inspect --core core.12345 vcpus
  virtopt inspect --core core.12345 --exe /usr/bin/qemu-system-x86_64 timers --json

QEMU is never stopped: the views read its memory while it runs (a live snapshot, values a
few microseconds apart), through drgn. Writes (trace enable/disable) and backtraces need
ptrace, which stops QEMU: use `virtopt gdb PID -c ...` for those. The JSON is what
`virtopt gdb PID -c 'virtopt VIEW --json'` prints. Views other than threads, vcpus (KVM),
timers and trace need QEMU's debug info (a debug build, or its debug symbols).
exit codes: 0 ok, 1 the read failed or the process is not QEMU, 2 usage error or a view
not available on this QEMU."""

REFUSED = {
    "trace enable": "virtopt gdb PID -c 'trace enable PATTERN'",
    "trace disable": "virtopt gdb PID -c 'trace disable PATTERN'",
}


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pid", nargs="?", metavar="VM",
                   help="the running QEMU (never stopped): PID, VM name (-name), QMP socket or libvirt:DOMAIN")
    p.add_argument("--core", metavar="CORE", help="a core file of QEMU instead of a running process")
    p.add_argument("--exe", metavar="QEMU", help="QEMU's executable (default: the one PID runs, or the core's)")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="VIEW ...", help="the view and its arguments")
    p.set_defaults(func=run)


def _view_parser() -> argparse.ArgumentParser:
    vp = argparse.ArgumentParser(prog="virtopt inspect PID", add_help=True)
    vs = vp.add_subparsers(dest="view", metavar="VIEW")

    def view(name: str, help_: str) -> argparse.ArgumentParser:
        p = vs.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print the data as JSON (same as --output=json)")
        add_output_option(p)
        return p

    view("info", "QEMU version, accelerator, debug info, which views work here")
    view("threads", "threads and their roles, BQL holder")
    view("vcpus", "each vCPU's CPUState")
    mt = view("mtree", "memory region tree or flat view; `mtree lookup ADDR`")
    mt.add_argument("words", nargs="*", metavar="AS | lookup ADDR", help="address space, or lookup ADDR")
    mt.add_argument("--flat", action="store_true", help="the flat view QEMU dispatches with (info mtree -f)")
    mt.add_argument("--disabled", action="store_true", help="also show disabled regions (info mtree -D)")
    mt.add_argument("--as", dest="lookup_as", default="memory",
                    help="address space of a lookup: memory, io (I/O), ... (default memory)")
    view("timers", "armed timers per clock")
    tr = view("trace", "trace list [PATTERN...] [--enabled]")
    tr.add_argument("words", nargs="+", metavar="list PATTERN", help="list, then event names or globs")
    tr.add_argument("--enabled", action="store_true", help="only the enabled events")
    q = view("qcow2", "live qcow2 cache state")
    q.add_argument("node", nargs="?", metavar="NODE", help="node name, -drive id, or image file name")
    q.add_argument("--slices", action="store_true", help="list every cached slice")
    co = view("coroutines", "coroutines in flight")
    co.add_argument("--pools", action="store_true", help="also list free coroutines in the pools")
    co.add_argument("--bt", metavar="N|ADDR", help=argparse.SUPPRESS)
    from . import cli_hang

    cli_hang.add_parsers(view)  # block, waiters, locks, cpustate, bt
    return vp


def _target(args: argparse.Namespace) -> Any:
    from qemu_ext.errors import VirtoptError
    from qemu_ext.introspect.drgn_backend import DrgnTarget

    if args.core:
        return DrgnTarget.open_core(args.core, args.exe)
    from qemu_ext.host.target import resolve_pid

    if args.pid is None:
        raise VirtoptError("say which QEMU: PID, VM name, QMP socket or libvirt:DOMAIN", exit_code=2)
    return DrgnTarget.attach(resolve_pid(str(args.pid)), args.exe)


def run(args: argparse.Namespace) -> int:
    from qemu_ext.errors import NotAvailableError, VirtoptError
    from qemu_ext.introspect import cli_hang, render, threads, views

    rest = list(args.rest)
    while (len(rest) >= 2 and rest[0] in ("--core", "--exe")) or (rest and rest[0].startswith(("--core=", "--exe="))):
        opt, _, val = rest[0].partition("=")  # `inspect PID --exe QEMU VIEW`: options after the PID
        if not val:
            val = rest.pop(1)
        rest.pop(0)
        setattr(args, opt[2:], val)
    if args.core and args.pid is not None:
        rest.insert(0, args.pid)  # `inspect --core C VIEW`: the first word was the view
        args.pid = None
    if not args.core and args.pid is None:
        raise VirtoptError("say which QEMU: virtopt inspect PID VIEW, or virtopt inspect --core CORE VIEW",
                           exit_code=2)
    if not rest:
        rest = ["info"]
    vp = _view_parser()
    va = vp.parse_args(rest)
    if va.view is None:
        vp.print_help(sys.stderr)
        return 2
    as_json = va.json or va.output == "json"
    name, kw = va.view, {}
    if name == "mtree":
        words = va.words
        if words and words[0] == "lookup":
            if len(words) != 2:
                raise VirtoptError("usage: virtopt inspect PID mtree lookup ADDR [--as AS]", exit_code=2)
            name, kw = "mtree lookup", {"addr": words[1], "address_space": va.lookup_as}
        else:
            if len(words) > 1:
                raise VirtoptError(f"mtree takes one address space, not {' '.join(words)}", exit_code=2)
            kw = {"address_space": words[0] if words else None, "flat_view": va.flat}
    elif name == "trace":
        sub, patterns = va.words[0], va.words[1:]
        if f"trace {sub}" in REFUSED:
            raise NotAvailableError(f"virtopt inspect never writes QEMU's memory (it never stops QEMU): "
                                    f"use {REFUSED[f'trace {sub}']} (it pauses QEMU while it writes)")
        if sub != "list":
            raise VirtoptError(f"unknown trace sub-command {sub!r}: virtopt inspect PID trace list [PATTERN...]",
                               exit_code=2)
        name, kw = "trace list", {"patterns": patterns, "enabled_only": va.enabled}
    elif name == "qcow2":
        kw = {"node": va.node}
    elif name == "coroutines":
        if va.bt is not None:
            raise NotAvailableError("a coroutine backtrace unwinds with gdb's unwinder: use "
                                    f"virtopt gdb PID -c 'coroutines --bt {va.bt}' (it pauses QEMU while it reads), "
                                    "or virtopt gdb --core CORE")
        kw = {"pools": va.pools}
    elif name in cli_hang.NAMES:
        kw = cli_hang.view_args(name, va)
    t = _target(args)
    data = views.run(t, name, **kw)
    if as_json:
        print_json(data)
        return 0
    text = {
        "info": lambda d: render.info(d),
        "threads": render.threads,
        "vcpus": lambda d: render.vcpus(d, threads.thread_names(t)),
        "mtree": lambda d: render.mtree(d, va.disabled),
        "mtree lookup": render.mtree_lookup,
        "timers": render.timers,
        "trace list": render.trace_list,
        "qcow2": lambda d: render.qcow2(d, va.slices),
        "coroutines": lambda d: render.coroutines(d, va.pools),
        **{n: (lambda d, n=n: cli_hang.render(n, d)) for n in cli_hang.NAMES},
    }[name](data)
    sys.stdout.write(text)
    sys.stdout.write(render.snapshot(data["snapshot"]))
    return 0
