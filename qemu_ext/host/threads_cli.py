"""`virtopt threads PID|--qmp SOCKET [--pin ROLE=CPUS,...]`: render qemu_ext.host.threads."""

from __future__ import annotations

import argparse
from typing import Optional

from qemu_ext.errors import BadInputError
from qemu_ext.output import add_output_option, print_json

EPILOG = """\
examples:
  virtopt threads $(pidof qemu-system-x86_64)
  virtopt threads --qmp /run/vm.qmp --output=json
  virtopt threads --qmp /run/vm.qmp --pin vcpu0=2,vcpu1=3,io=4
  virtopt threads --qmp /run/vm.qmp --pin vcpus=2-3,main=0

roles: main loop, vcpu (with its index), iothread (with its id), monitor iothread, worker,
call_rcu, trace, ... Without --qmp they come from the names QEMU gives its threads with
-name NAME,debug-threads=on; with --qmp, vCPUs and iothreads come from query-cpus-fast and
query-iothreads. --pin keys: vcpuN, vcpus, io, io:ID, main, monitor, worker, call_rcu, trace;
a key that names no thread is refused and nothing is changed. QEMU's QMP monitor serves one
client at a time: when libvirt or a shell holds the socket, use the PID form or a second -qmp.

exit codes: 0 ok, 1 no such process / QMP failed / role not found, 2 usage error.
"""


def register(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pid", nargs="?", type=int, help="QEMU process id")
    p.add_argument("--qmp", metavar="SOCKET", help="QMP unix socket of the QEMU (gives its pid, vCPUs and iothreads)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for QMP answers (default 10)")
    p.add_argument("--pin", metavar="ROLE=CPUS,...", help="set thread affinities, e.g. vcpu0=2,vcpu1=3,io=4")
    add_output_option(p)
    p.set_defaults(func=run)


def resolve(
    pid: Optional[int], qmp: Optional[str], timeout: float = 10.0
) -> tuple[int, Optional[list[dict]], Optional[list[dict]]]:
    """PID plus QMP answers (or None) for a `PID|--qmp SOCKET` pair of arguments."""
    from qemu_ext.errors import QemuError
    from qemu_ext.host.threads import query_qmp

    if qmp:
        q = query_qmp(qmp, timeout)
        if pid is not None and pid != q.pid:
            raise QemuError(f"QMP socket {qmp} belongs to pid {q.pid}, not {pid}")
        return q.pid, q.vcpus, q.iothreads
    if pid is None:
        raise BadInputError("give a QEMU pid or --qmp SOCKET", exit_code=2)
    return pid, None, None


def run(args: argparse.Namespace) -> int:
    from qemu_ext.host import procfs
    from qemu_ext.host.threads import parse_pin_plan, pin_threads, thread_map

    pid, vcpus, iothreads = resolve(args.pid, args.qmp, args.timeout)
    if args.pin:
        plan = parse_pin_plan(args.pin)
        results = pin_threads(pid, plan, vcpus, iothreads)
        if args.output == "json":
            print_json({"pid": pid, "pinned": [r.to_dict() for r in results]})
        else:
            print(f"QEMU pid {pid}: pinned {len(results)} thread(s)")
            print(f"{'TID':>8}  {'role':<18} {'name':<18} {'before':<10} {'after':<10}")
            for r in results:
                print(f"{r.tid:>8}  {r.role:<18} {r.name:<18} {procfs.format_cpu_list(r.before):<10} "
                      f"{procfs.format_cpu_list(r.after):<10}")
        return 0
    threads = thread_map(pid, vcpus, iothreads)
    if args.output == "json":
        print_json({"pid": pid, "threads": [t.to_dict() for t in threads]})
        return 0
    src = "QMP + thread names" if args.qmp else "thread names"
    print(f"QEMU pid {pid}: {len(threads)} threads (roles from {src})")
    print(f"{'TID':>8}  {'role':<22} {'name':<18} {'last CPU':>8}  affinity")
    for t in threads:
        role = t.label + (" (inferred)" if t.source == "inferred" else "")
        last = "-" if t.last_cpu is None else str(t.last_cpu)
        print(f"{t.tid:>8}  {role:<22} {t.name:<18} {last:>8}  {procfs.format_cpu_list(t.affinity)}")
    if not any(t.role == "vcpu" for t in threads):
        print("note: no vCPU thread recognised; start QEMU with -name NAME,debug-threads=on or pass --qmp SOCKET")
    return 0
