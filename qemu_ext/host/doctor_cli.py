"""`virtopt doctor [--vm VM | --qmp ADDR | --domain NAME] [--interval S] [--root DIR]`: render qemu_ext.host.doctor."""

from __future__ import annotations

import argparse

from qemu_ext.host.threads_cli import add_vm_options
from qemu_ext.output import add_output_option, human_size, number, print_json

EPILOG = """\
examples:
  virtopt doctor
  virtopt doctor --vm web1 --interval 2                  (the QEMU started with -name web1)
  virtopt doctor --qmp /run/vm.qmp --output=json
  virtopt doctor --domain web1                           (a libvirt domain: its <cputune>, <numatune>, ...)
  virtopt doctor --check tracing --check x2apic
  virtopt doctor --root captured/ --second-sample captured/later --interval 1

checks: cpu-isolation, timer-ticks, isolated-use, x2apic, kvm, tracing, irq-affinity, irq-load,
cache-topology, numa, huge-pages; with --vm/--qmp/--domain also threads, vcpu-pinning, qemu-memory;
with --domain also the domain XML against the host, each with the XML fix: libvirt-vcpupin,
libvirt-emulatorpin, libvirt-numa (<numatune>, one L3), libvirt-hugepages, libvirt-cpu.
--vm (alias --pid) takes a PID, a VM name, a QMP socket or HOST:PORT, or libvirt:DOMAIN; a process
that is not QEMU is refused before anything of it is read.
Each says what it found, a verdict (ok, warn, bad, unknown: a file it needs is missing or not
readable) and the fix. timer-ticks and irq-load sample /proc/interrupts and /proc/stat twice,
--interval seconds apart (0 skips them).

exit codes: 0 the checks ran (whatever they found; see --fail-on), 1 --fail-on matched or the
QEMU could not be found or read (not QEMU, no such process, dead socket), 2 usage error.
"""

MARK = {"ok": "[ OK ]", "warn": "[WARN]", "bad": "[BAD ]", "unknown": "[ ?? ]"}


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--vm", "--pid", dest="vm", metavar="VM",
                   help="a QEMU to check as well (threads, pinning, memory): PID, VM name, QMP socket, libvirt:DOMAIN")
    add_vm_options(p)
    p.add_argument("--interval", type=number(float, 0, 3600), default=1.0, metavar="S",
                   help="seconds between the two samples of /proc/interrupts and /proc/stat, 0 to 3600 "
                        "(default 1; 0 = skip)")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="read /proc and /sys under DIR (a captured tree) instead of / (default /)")
    p.add_argument("--second-sample", metavar="DIR",
                   help="with --root: a tree holding proc/interrupts and proc/stat taken --interval s later")
    p.add_argument("--check", action="append", metavar="ID", help="run only this check (repeatable)")
    p.add_argument("--fail-on", choices=("bad", "warn"), help="exit 1 when a check is bad (or warn or bad)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each check's details")
    add_output_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from qemu_ext.errors import BadInputError
    from qemu_ext.host import target
    from qemu_ext.host.doctor import run_doctor

    if not os.path.isdir(args.root):
        raise BadInputError(f"--root {args.root}: not a directory", exit_code=2)
    if args.second_sample and not os.path.isdir(args.second_sample):
        raise BadInputError(f"--second-sample {args.second_sample}: not a directory", exit_code=2)
    t = None
    if args.vm is not None or args.qmp or args.domain:
        t = target.resolve(args.vm, args.qmp, args.domain, args.timeout, root=args.root)
    pid = t.pid if t is not None else None
    report = run_doctor(args.root, pid, t.vcpus if t else None, t.iothreads if t else None, args.interval,
                        args.second_sample, args.check, source=(t.thread_source if t else None) or "qmp",
                        domain=t.libvirt.xml if t is not None and t.libvirt is not None else None,
                        size=human_size)
    if args.output == "json":
        print_json(report.to_dict())
    else:
        where = "" if args.root == "/" else f" (tree {args.root})"
        print(f"virtopt doctor{where}" + (f", {t.describe()}" if t is not None else ""))
        width = max([15] + [len(c.id) for c in report.checks])
        pad = " " * (width + 7)
        for c in report.checks:
            print(f"{MARK.get(c.verdict, c.verdict)} {c.id:<{width}} {c.summary}")
            if args.verbose:
                for d in c.details:
                    print(f"{pad}{d}")
            elif c.verdict != "ok":
                for d in c.details[:5]:
                    print(f"{pad}{d}")
            if c.fix and c.verdict != "ok":
                print(f"{pad}fix: {c.fix}")
        n = report.counts()
        print(f"{n['ok']} ok, {n['warn']} warn, {n['bad']} bad, {n['unknown']} unknown")
    counts = report.counts()
    if args.fail_on == "bad" and counts["bad"]:
        return 1
    if args.fail_on == "warn" and (counts["bad"] or counts["warn"]):
        return 1
    return 0
