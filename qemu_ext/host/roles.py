"""The one table of QEMU thread roles, used by `virtopt threads`, the shell's `/threads`, the gdb
pack's `virtopt threads` and `virtopt inspect threads`: same role values in JSON, same labels and
columns in human output.

A role has a JSON value (kebab-case, stable: scripts match on it) and a human label; vCPU and
iothread roles carry their index / id (``vcpu-index``, ``iothread-id`` in JSON) and label with it
("vCPU 0", "iothread io0").

Thread names are QEMU's own (``-name NAME,debug-threads=on``; qemu_thread_create() in
util/qemu-thread-posix.c, 7.2 and 10.0); thread functions are the start routines QEMU passes to
qemu_thread_create (for gdb/drgn, when threads are unnamed). Standard library only: the gdb pack
imports this module inside gdb's own Python.
"""

from __future__ import annotations

import re
from typing import Optional

# JSON value -> human label
ROLES: dict[str, str] = {
    "main-loop": "main loop",
    "vcpu": "vCPU",  # + " N"
    "iothread": "iothread",  # + " ID"
    "monitor-iothread": "monitor iothread",
    "worker": "worker",
    "call-rcu": "call_rcu",
    "trace-writer": "trace writer",
    "vnc-worker": "vnc worker",
    "spice-worker": "spice worker",
    "migration": "migration",
    "vhost": "vhost",
    "kvm-kernel": "kvm kernel worker",  # kvm-nx-lpage-recovery etc.: the kernel's, in QEMU's thread group
    "other": "other",
}

# thread name (comm, 15 characters at most) -> role; first match wins
_NAME_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^CPU (\d+)/(KVM|TCG|HVF|WHPX|NVMM|HAX|dummy|qtest)$"), "vcpu"),
    (re.compile(r"^ALL CPUs/TCG$"), "vcpu"),  # single-threaded (round-robin) TCG: one thread, every vCPU
    (re.compile(r"^IO mon_iothread$"), "monitor-iothread"),
    (re.compile(r"^IO (.+)$"), "iothread"),
    (re.compile(r"^worker$"), "worker"),
    (re.compile(r"^call_rcu$"), "call-rcu"),
    (re.compile(r"^trace-thread$"), "trace-writer"),
    (re.compile(r"^vnc_worker$"), "vnc-worker"),
    (re.compile(r"^SPICE Worker$"), "spice-worker"),
    (re.compile(r"^(live_migration|mig/.*|multifd.*|postcopy/.*|migration.*)$"), "migration"),
    (re.compile(r"^vhost-"), "vhost"),
    (re.compile(r"^kvm-"), "kvm-kernel"),
]

# thread start routine -> role (gdb/drgn: the outermost QEMU frame of an unnamed thread)
FUNCTION_ROLES: dict[str, str] = {
    "kvm_vcpu_thread_fn": "vcpu",
    "mttcg_cpu_thread_fn": "vcpu",
    "rr_cpu_thread_fn": "vcpu",
    "dummy_cpu_thread_fn": "vcpu",
    "iothread_run": "iothread",
    "worker_thread": "worker",
    "call_rcu_thread": "call-rcu",
    "writeout_thread": "trace-writer",
    "migration_thread": "migration",
    "vnc_worker_thread": "vnc-worker",
    "qemu_main_loop": "main-loop",
}

# `virtopt threads --pin KEY=CPUS` keys -> role (vcpuN and io=ID select one thread)
PIN_KEYS: dict[str, str] = {
    "vcpu": "vcpu",
    "io": "iothread",
    "main": "main-loop",
    "mon": "monitor-iothread",
    "worker": "worker",
    "rcu": "call-rcu",
    "trace": "trace-writer",
}

# The columns every thread table shows, in this order (human output).
COLUMNS = ("TID", "NAME", "ROLE", "LAST CPU", "AFFINITY", "IDENTIFIED BY")

# "identified-by" values: how a view knew a thread's role.
IDENTIFIED_BY: dict[str, str] = {
    "pid": "the main loop: the thread whose TID is the PID",
    "qmp": "a thread-id in QMP's query-cpus-fast / query-iothreads",
    "libvirt": "libvirt's record of the domain's vCPU and iothread TIDs (its status XML)",
    "name": "the thread name QEMU sets with -name NAME,debug-threads=on",
    "function": "the thread's start routine (gdb/drgn backtrace)",
    "kvm-fd": "the thread sits in ioctl(KVM_RUN) on a kvm-vcpu fd",
    "inferred": "the one unnamed thread of a debug-threads QEMU besides the main loop (call_rcu)",
}

# The JSON keys of one thread, in this order (CONTRIBUTING.md "Threads"); views may add keys after.
JSON_KEYS = ("tid", "name", "role", "vcpu-index", "iothread-id", "label", "last-cpu", "affinity", "identified-by")


def role_from_name(name: str) -> tuple[str, Optional[int], Optional[str]]:
    """(role, vCPU index, iothread id) from a thread name; ("other", None, None) when it says nothing.

    "ALL CPUs/TCG" (single-threaded TCG) is the vCPU role with no single index.
    """
    for rx, role in _NAME_RULES:
        m = rx.match(name)
        if not m:
            continue
        if role == "vcpu":
            return role, (int(m.group(1)) if m.groups() else None), None
        if role == "iothread":
            return role, None, m.group(1)
        return role, None, None
    return "other", None, None


def label(role: str, vcpu: Optional[int] = None, iothread: Optional[str] = None) -> str:
    """The human label: "vCPU 0", "vCPUs (single-threaded TCG)", "iothread io0", "main loop", ..."""
    if role == "vcpu":
        return f"vCPU {vcpu}" if vcpu is not None else "vCPUs (single-threaded TCG)"
    if role == "iothread" and iothread:
        return f"iothread {iothread}"
    return ROLES.get(role, role)


def thread_json(tid: int, name: str, role: str, vcpu: Optional[int] = None, iothread: Optional[str] = None,
                last_cpu: Optional[int] = None, affinity: Optional[str] = None,
                identified_by: Optional[str] = None) -> dict:
    """One thread in the JSON every view gives (``affinity`` in the kernel's cpu-list form, "0-1")."""
    return {
        "tid": tid,
        "name": name,
        "role": role,
        "vcpu-index": vcpu if role == "vcpu" else None,
        "iothread-id": iothread if role == "iothread" else None,
        "label": label(role, vcpu, iothread),
        "last-cpu": last_cpu,
        "affinity": affinity,
        "identified-by": identified_by,
    }


def row(thread: dict) -> list[str]:
    """The COLUMNS cells of one thread given as thread_json() returns it ("-" for what a view cannot know)."""

    def cell(v: object) -> str:
        return "-" if v is None or v == "" else str(v)

    return [cell(thread.get("tid")), cell(thread.get("name")), cell(thread.get("label")),
            cell(thread.get("last-cpu")), cell(thread.get("affinity")), cell(thread.get("identified-by"))]
