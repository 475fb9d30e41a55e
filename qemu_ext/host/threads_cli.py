"""`virtopt threads VM [--pin ROLE=CPUS,...]`: render qemu_ext.host.threads for the QEMU that
qemu_ext.host.target resolves (PID, VM name, QMP address, libvirt domain)."""

from __future__ import annotations

import argparse
from typing import Any

from qemu_ext.output import add_output_option, number, print_json, table

EPILOG = """\
examples:
  virtopt threads web1                                   (the QEMU started with -name web1)
  virtopt threads /run/vm.qmp --output=json              (vCPU and iothread TIDs from QMP)
  virtopt threads 12345
  virtopt threads web1 --pin vcpu0=2,vcpu1=3,io=4
  virtopt threads --qmp localhost:4444 --pin vcpu=2-3,main=0
  virtopt threads --domain web1                          (a libvirt domain: its pinning beside the real one)

VM is a PID, a VM name (QEMU's -name, else QMP query-name), a QMP socket or HOST:PORT, or
libvirt:DOMAIN. A process that is not QEMU is refused before anything is read or changed; when
several QEMUs carry the name, their PIDs are listed: give one of them.

roles: main loop, vCPU N, iothread ID, monitor iothread, worker, call_rcu, trace writer, ... From
a PID or a name they come from the names QEMU gives its threads with -name NAME,debug-threads=on;
through QMP, vCPUs and iothreads come from query-cpus-fast and query-iothreads. --pin keys:
vcpuN, vcpu (every vCPU), io, io:ID, main, mon, worker, rcu, trace; a key that names no thread
is refused and nothing is changed. QEMU's QMP monitor serves one client at a time: when libvirt
or a shell holds the socket, give the PID or the name, or a second -qmp.

exit codes: 0 ok, 1 no such process / not QEMU / QMP failed / role not found, 2 usage error.
"""


def add_vm_options(p: argparse.ArgumentParser) -> None:
    """--qmp, --domain and --timeout: the ways to name a QEMU besides the VM argument (threads, doctor)."""
    p.add_argument("--qmp", metavar="ADDR",
                   help="QMP unix socket or HOST:PORT of the QEMU (gives its pid, vCPUs and iothreads)")
    p.add_argument("--domain", metavar="NAME", help="a libvirt domain (qemu:///system)")
    p.add_argument("--timeout", type=number(float, 0, 3600, lo_open=True), default=10.0, metavar="S",
                   help="seconds to wait for QMP answers, above 0 and at most 3600 (default 10)")


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("vm", nargs="?", metavar="VM",
                   help="the QEMU: PID, VM name, QMP socket or HOST:PORT, libvirt:DOMAIN")
    add_vm_options(p)
    p.add_argument("--pin", metavar="ROLE=CPUS,...", help="set thread affinities, e.g. vcpu0=2,vcpu1=3,io=4")
    add_output_option(p)
    p.set_defaults(func=run)


def resolve_args(args: argparse.Namespace) -> Any:
    """The Target of a VM / --qmp / --domain set of arguments (usage error when none is given)."""
    from qemu_ext.errors import BadInputError
    from qemu_ext.host import target

    if args.vm is None and args.qmp is None and args.domain is None:
        raise BadInputError(f"give the QEMU: {target.VM_FORMS} (or --qmp ADDR, --domain NAME)", exit_code=2)
    return target.resolve(args.vm, args.qmp, args.domain, args.timeout)


def run(args: argparse.Namespace) -> int:
    from qemu_ext.host import procfs, roles
    from qemu_ext.host.threads import parse_pin_plan, pin_threads, thread_map

    plan = parse_pin_plan(args.pin) if args.pin else None  # a bad plan is refused before QEMU is looked at
    t = resolve_args(args)
    if plan is not None:
        results = pin_threads(t.pid, plan, t.vcpus, t.iothreads, source=t.thread_source or "qmp")
        if args.output == "json":
            print_json({"pid": t.pid, "vm-name": t.vm_name, "pinned": [r.to_dict() for r in results]})
            return 0
        print(f"{t.describe()}: pinned {len(results)} thread(s)")
        rows = [[str(r.tid), r.name, r.label, procfs.format_cpu_list(r.before), procfs.format_cpu_list(r.after)]
                for r in results]
        print(table(("TID", "NAME", "ROLE", "BEFORE", "AFTER"), rows, right=(0,)))
        if t.domain:
            print(f"note: libvirt does not know of this change; it lasts until the domain restarts. To keep it, "
                  f"set <cputune> in the domain XML (virsh edit {t.domain}) or use virsh vcpupin/emulatorpin")
        return 0
    threads = thread_map(t.pid, t.vcpus, t.iothreads, source=t.thread_source or "qmp")
    extra = t.thread_extra
    if extra:
        for th in threads:
            th.extra.update(extra(th))
    if args.output == "json":
        print_json({"pid": t.pid, "vm-name": t.vm_name, "threads": [th.to_dict() for th in threads]})
        return 0
    src = {"qmp": "QMP + thread names", "libvirt": "libvirt + thread names"}.get(t.thread_source or "", "thread names")
    print(f"{t.describe()}: {len(threads)} threads (roles from {src})")
    headers = list(roles.COLUMNS)
    rows = [th.row() for th in threads]
    if extra:
        headers.append("LIBVIRT PINNING")
        rows = [[*r, th.extra.get("libvirt-pinning") or "-"] for r, th in zip(rows, threads)]
    print(table(headers, rows, right=(0, 3)))
    for note in t.notes:
        print(f"note: {note}")
    if not any(th.role == "vcpu" for th in threads):
        print("note: no vCPU thread recognised; start QEMU with -name NAME,debug-threads=on or give its QMP socket")
    return 0
