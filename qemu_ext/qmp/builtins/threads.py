"""``/threads``: QEMU's threads and their roles, the same columns and JSON as `virtopt threads`
(library: :func:`qemu_ext.host.threads.thread_map`, roles from :mod:`qemu_ext.host.roles`)."""

from __future__ import annotations

import argparse

from qemu_ext.errors import NotAvailableError
from qemu_ext.host import roles
from qemu_ext.output import table
from qemu_ext.qmp.builtins.registry import Context, Result, builtin

NO_NAMES_HINT = ("note: QEMU did not name its threads, so only the main loop and what QMP reports (vCPUs, "
                 "iothreads) have a role and the rest show as 'other': start QEMU with "
                 "-name NAME,debug-threads=on to name them")


@builtin("threads", "QEMU's threads, their roles, last CPU and affinity (as virtopt threads)",
         examples=["/threads", "/json threads"])
async def threads(ctx: Context, a: argparse.Namespace) -> Result:
    s = ctx.session
    if s.pid is None:
        raise NotAvailableError("cannot tell which process QEMU is (TCP to another host?): its threads cannot be "
                                "read; connect through its unix socket on the QEMU host")
    from qemu_ext.host.threads import thread_map

    vcpus = await s.execute("query-cpus-fast")
    iothreads = await s.execute("query-iothreads")
    name = (await s.execute("query-name")).get("name")
    items = [t.to_dict() for t in thread_map(s.pid, vcpus=vcpus, iothreads=iothreads)]
    text = table(list(roles.COLUMNS), [roles.row(t) for t in items], right=(0, 3))
    main = next((t for t in items if t["tid"] == s.pid), None)
    # QEMU names its threads only with debug-threads=on; the kernel's kvm-* workers have their own names
    if main is not None and all(t["name"] == main["name"] for t in items if t["role"] != "kvm-kernel"):
        text += "\n" + NO_NAMES_HINT
    return Result({"pid": s.pid, "vm-name": name, "threads": items}, text)
