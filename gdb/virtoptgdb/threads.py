"""`virtopt threads`: gdb's threads mapped to QEMU roles (vCPU n, iothread, main loop, workers) and the BQL."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Optional

import gdb

from . import core

NAME_ROLES = [
    (re.compile(r"^CPU (\d+)/(\w+)$"), "vcpu"),
    (re.compile(r"^IO (.+)$"), "iothread"),
    (re.compile(r"^worker$"), "worker"),
    (re.compile(r"^call_rcu$"), "rcu"),
    (re.compile(r"^trace-thread$"), "trace-writer"),
    (re.compile(r"^kvm-"), "kvm-kernel"),
    (re.compile(r"^(live_migration|mig/.*|migration.*)$"), "migration"),
    (re.compile(r"^multifd"), "migration"),
    (re.compile(r"^vnc_worker$"), "vnc-worker"),
    (re.compile(r"^(postcopy/.*|mig/dst/.*)$"), "migration"),
]
FUNC_ROLES = {
    "kvm_vcpu_thread_fn": "vcpu", "mttcg_cpu_thread_fn": "vcpu", "rr_cpu_thread_fn": "vcpu",
    "dummy_cpu_thread_fn": "vcpu", "iothread_run": "iothread", "worker_thread": "worker",
    "call_rcu_thread": "rcu", "writeout_thread": "trace-writer", "migration_thread": "migration",
    "vnc_worker_thread": "vnc-worker", "qemu_main_loop": "main-loop",
}
MAX_FRAMES = 40


def bql_owner() -> tuple[bool, Optional[int]]:
    """(known, tid holding qemu_global_mutex or None): pthread_mutex_t.__data.__owner."""
    if core.has_debug_info():
        try:
            m = core.value_of("qemu_global_mutex")
            owner = int(m["lock"]["__data"]["__owner"])
            return True, owner or None
        except (core.VirtoptGdbError, gdb.error):
            pass
    addr = core.symbol_address("qemu_global_mutex")
    if addr is not None:  # glibc x86-64: int __lock; unsigned __count; int __owner
        owner = core.read_s32(addr + 8)
        return True, owner or None
    return False, None


SYS_IOCTL = 16  # x86-64
KVM_RUN = 0xAE80


def kvm_vcpu_of_thread(pid: int, tid: int) -> Optional[int]:
    """The vCPU id a thread runs, when it sits in ioctl(fd, KVM_RUN) on a kvm-vcpu:N fd (no debug info,
    no thread names needed: /proc/PID/task/TID/syscall and the fd's anon-inode name tell)."""
    if core.comm(tid).startswith("kvm-"):
        return None  # KVM's kernel workers (kvm-nx-lpage-recovery) start from a vCPU thread's registers
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            fields = f.read().split()
        if len(fields) < 3 or fields[0] != str(SYS_IOCTL) or int(fields[2], 16) != KVM_RUN:
            return None
        link = os.readlink(f"/proc/{pid}/fd/{int(fields[1], 16)}")
    except (OSError, ValueError):
        return None
    mo = re.match(r"^anon_inode:kvm-vcpu:(\d+)$", link)
    return int(mo.group(1)) if mo else None


def _frame_role() -> Optional[str]:
    try:
        f = gdb.newest_frame()
    except gdb.error:
        return None
    n = 0
    while f is not None and n < MAX_FRAMES:
        name = f.name()
        if name in FUNC_ROLES:
            return FUNC_ROLES[name]
        try:
            f = f.older()
        except gdb.error:
            break
        n += 1
    return None


def collect_threads(use_frames: bool = True) -> dict[str, Any]:
    """Every thread of the process with its role, and who holds the BQL."""
    inf = core.inferior()
    pid = inf.pid
    cpu_by_tid: dict[int, int] = {}
    if core.has_debug_info():
        from . import vcpus

        try:
            cpu_by_tid = {c["thread-id"]: c["cpu-index"] for c in vcpus.cpu_states()}
        except (core.VirtoptGdbError, gdb.error):
            cpu_by_tid = {}
    known, owner = bql_owner()
    selected = gdb.selected_thread()
    rows = []
    try:
        for th in sorted(inf.threads(), key=lambda t: t.num):
            tid = th.ptid[1]
            name = core.comm(tid) or (th.name or "")
            role, via, vcpu, iothread = "unknown", None, None, None
            for pat, r in NAME_ROLES:
                mo = pat.match(name)
                if mo:
                    role, via = r, "name"
                    if r == "vcpu":
                        vcpu = int(mo.group(1))
                    elif r == "iothread":
                        iothread = mo.group(1)
                    break
            if tid in cpu_by_tid:
                role, via, vcpu = "vcpu", "cpu-state", cpu_by_tid[tid]
            elif tid == pid:
                role, via = "main-loop", "pid"
            if role == "unknown":
                kv = kvm_vcpu_of_thread(pid, tid)
                if kv is not None:
                    role, via, vcpu = "vcpu", "kvm-vcpu-fd", kv
            if role == "unknown" and use_frames:
                th.switch()
                fr = _frame_role()
                if fr:
                    role, via = fr, "frames"
            rows.append({
                "gdb-id": th.num, "tid": tid, "name": name, "role": role, "vcpu": vcpu,
                "iothread": iothread, "holds-bql": known and owner == tid, "identified-by": via,
            })
    finally:
        if selected is not None and selected.is_valid():
            selected.switch()
    return {"pid": pid, "bql": {"known": known, "holder": owner}, "threads": rows}


class ThreadsCommand(core.VirtoptCommand):
    name = "threads"
    summary = "gdb threads mapped to QEMU roles (vCPU n, iothread, main loop, workers, rcu) and the BQL holder."
    epilog = "examples:\n  virtopt threads\n  virtopt threads --json\n  virtopt threads --no-frames"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-frames", action="store_true",
                       help="do not look at stacks to identify unnamed threads (faster)")

    def collect(self, args: argparse.Namespace) -> Any:
        return collect_threads(use_frames=not args.no_frames)

    def render(self, d: Any, args: argparse.Namespace) -> None:
        rows = []
        for t in d["threads"]:
            role = t["role"]
            if t["vcpu"] is not None:
                role = f"vcpu {t['vcpu']}"
            elif t["iothread"]:
                role = f"iothread {t['iothread']}"
            rows.append([t["gdb-id"], t["tid"], t["name"], role, t["identified-by"] or "-",
                         "BQL" if t["holds-bql"] else ""])
        gdb.write(core.table(rows, ["GDB", "TID", "NAME", "ROLE", "BY", ""]))
        b = d["bql"]
        if not b["known"]:
            gdb.write("BQL holder: unknown (qemu_global_mutex is not visible without debug info)\n")
        else:
            gdb.write(f"BQL holder: {b['holder'] if b['holder'] else 'none'}\n")


def register() -> None:
    ThreadsCommand()
