"""`virtopt gdb VM -c CMD ...` / `virtopt gdb --core CORE`: run virtopt's gdb commands (and gdb's own)
against a live QEMU or a core file, print what they return and how long QEMU was paused."""

from __future__ import annotations

import argparse
import sys

from qemu_ext.errors import VirtoptError
from qemu_ext.gdbmi import driver
from qemu_ext.output import add_output_option, duration, number, print_json

EPILOG = """\
examples:
  virtopt gdb 12345                                    (virtopt info: what works in this QEMU)
  virtopt gdb web1 -c threads -c vcpus                 (the VM named web1; one attach, two commands)
  virtopt gdb 12345 -c 'threads --json'                (the command's JSON alone on stdout)
  virtopt gdb 12345 -c 'mtree lookup 0xfee00000'
  virtopt gdb 12345 -c "trace enable 'qcow2_cache_*'"
  virtopt gdb 12345 -c 'info registers rip'            (gdb's own command, run as is)
  virtopt gdb 12345 -c vcpus --output=json             (results and paused-seconds as JSON)
  virtopt gdb --core core.12345 -c threads -c timers   (post-mortem: the executable from the core)
  virtopt gdb --core core.12345 --exe /usr/bin/qemu-system-x86_64 -c info
  virtopt gdb --path                                   (the script to `source` in your own gdb)

VM is a PID, a VM name (-name), a QMP socket or libvirt:DOMAIN. A command whose first word is a
virtopt gdb command (info, threads, vcpus, mtree, timers, trace, qcow2, coroutines, block, waiters,
locks, bt, cpustate) is virtopt's; anything else runs as gdb's own command. Three words are gdb's
too: `info` alone, `trace list|enable|disable` and `bt all` are virtopt's, while `info registers`,
`trace LOCATION`, `bt` and `bt 5` are gdb's (`virtopt ...` spelled out is always virtopt's). gdb reads QEMU's symbols and the pack first, then attaches
(QEMU pauses), runs every command and detaches (QEMU runs again): the pause is printed on stderr
(`paused-seconds` in JSON). Ctrl-C, SIGTERM or SIGHUP at any moment detach first (Ctrl-Z detaches,
then suspends); gdb runs in its own session and a watchdog resumes QEMU if virtopt itself is killed. Commands that would resume,
signal or kill QEMU under gdb are refused, and on a core so is `trace enable|disable`.

exit codes: 0 all commands worked, 1 a command failed (or no such process, not QEMU, a core that
does not match its executable), 2 usage error, gdb missing, or a command not available here
(e.g. it needs debug info); 128+N interrupted by signal N (130 for Ctrl-C)."""


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=summary, description=summary, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vm", nargs="?", metavar="VM",
                   help="the QEMU to attach to: PID, VM name (-name), QMP socket or libvirt:DOMAIN")
    p.add_argument("--core", metavar="CORE", help="a core file of QEMU instead of a live process")
    p.add_argument("--exe", metavar="QEMU",
                   help="QEMU's executable (default: the process's; for a core, the one it names, else a QEMU "
                        "here with the core's build-id); checked by build-id")
    p.add_argument("-c", "--command", dest="commands", action="append", metavar="CMD",
                   help="command to run (repeatable; default: virtopt info)")
    p.add_argument("--gdb", default="gdb", help="gdb binary (default gdb)")
    p.add_argument("--timeout", type=number(float, lo=0, lo_open=True), default=30.0,
                   help="seconds to wait for each command before interrupting it (default 30)")
    p.add_argument("--path", action="store_true", help="print the path of the gdb pack script to `source`, and exit")
    add_output_option(p)
    p.set_defaults(func=run)


def _usage(message: str) -> VirtoptError:
    return VirtoptError(message, exit_code=2)


def run(args: argparse.Namespace) -> int:
    if args.path:
        if args.vm or args.core or args.commands:
            raise _usage("--path takes no VM, core or command")
        print(driver.pack_path())
        return 0
    if (args.vm is None) == (args.core is None):
        raise _usage("give the QEMU (PID, VM name, QMP socket, libvirt:DOMAIN) or --core CORE, not both"
                     if args.vm else "give the QEMU (PID, VM name, QMP socket, libvirt:DOMAIN) or --core CORE")
    commands = args.commands or ["virtopt info"]
    if args.output == "json":
        # --output=json: every virtopt command returns its data (its own --json), not its text
        commands = [_with_json(c) for c in commands]
    stop = driver.Stop()
    try:
        with driver.guard_signals(stop):  # from here on a signal is a request to stop, never a crash
            res = _run(args, commands, stop)
    except driver.Interrupted as exc:
        print(f"virtopt: {interrupted_line(exc)}", file=sys.stderr)
        return exc.exit_code
    finally:
        stop.close()
    codes = [0 if r.ok else driver.error_for(r.error or "").exit_code for r in res.results]
    if args.output == "json":
        print_json(res.to_dict())
    else:
        for r in res.results:
            if r.output:
                sys.stdout.write(r.output if r.output.endswith("\n") else r.output + "\n")
            if not r.ok:
                print(f"virtopt: {r.error}", file=sys.stderr)
        sys.stdout.flush()
        if res.pid is not None:
            print(pause_line(res), file=sys.stderr)
    failed = [c for c in codes if c]
    if not failed:
        return 0
    return 1 if 1 in failed else max(failed)


def _with_json(command: str) -> str:
    c = driver.normalize(command)
    if c.startswith("virtopt ") and "--json" not in c.split():
        return c + " --json"
    return command


def _run(args: argparse.Namespace, commands: list[str], stop: driver.Stop) -> driver.GdbRun:
    early = driver.prestart(args.gdb)  # gdb initialises while the VM is resolved and checked
    pid = None
    try:
        if args.vm is not None:
            from qemu_ext.host.target import resolve_pid

            pid = resolve_pid(args.vm)
    except BaseException:
        if early is not None:
            early.release()
        raise
    return driver.run(commands, pid=pid, core=args.core, exe=args.exe, gdb=args.gdb, timeout=args.timeout,
                      handle_signals=False, early=early, stop=stop)


def pause_line(res: driver.GdbRun) -> str:
    """`QEMU 123 was paused 270 ms (gdb attach to detach); it runs again`."""
    line = f"QEMU {res.pid} was paused {duration(res.paused_seconds or 0.0)} (gdb attach to detach)"
    if res.was_stopped:
        return f"QEMU {res.pid} was already stopped (state T) before gdb attached; it is left stopped"
    if res.resumed:
        return line + "; it was left stopped and virtopt resumed it (SIGCONT)"
    return line + "; it runs again"


def interrupted_line(exc: driver.Interrupted) -> str:
    if exc.pid is None:
        return f"interrupted by {exc.signame}"
    if not exc.attached:
        return f"interrupted by {exc.signame} before gdb attached: QEMU {exc.pid} was not paused"
    if exc.was_stopped:
        state = "QEMU was stopped before gdb attached and is left so"
    else:
        state = "QEMU runs again" if exc.qemu_running else "QEMU is not running (check it)"
    return (f"interrupted by {exc.signame}: gdb detached from QEMU {exc.pid} after a "
            f"{duration(exc.paused_seconds or 0.0)} pause; {state}")
