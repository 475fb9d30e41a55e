"""`locks`: who holds the BQL and who waits for it, the AioContext locks where the QEMU version has
them, what every thread is blocked on, and the CoMutexes held (7.2 and 10.0).

A thread blocked on a lock sits in futex(2) on the lock's word: its system call number and
arguments come from its registers (orig_rax, rdi, rsi, rdx: gdb live and cores) or, for a reader
that does not stop QEMU, from the kernel's view of the task's system call (procfs.task_syscall),
which the kernel fills for a blocked thread. The futex address is named by what lives there: the BQL (qemu_global_mutex in 7.2,
softmmu/cpus.c; bql since 9.1, system/cpus.c in 10.0), an AioContext's lock, a vCPU's halt_cond,
any global variable of QEMU. A glibc mutex is waited on by __lll_lock_wait with
futex(&mutex->__data.__lock, FUTEX_WAIT[_PRIVATE], 2); its holder is __data.__owner
(pthread_mutex_t on x86-64: int __lock; unsigned __count; int __owner).

AioContext locks: 7.2 has them (aio_context_acquire takes ctx->lock, a recursive QemuRecMutex,
util/async.c). QEMU 9.0 removed aio_context_acquire; 10.0 still initialises ctx->lock but nothing
takes it, so 10.0 reports none (decided by whether the executable has aio_context_acquire).
"""

from __future__ import annotations

import bisect
from typing import Any, Optional

from qemu_ext.host import procfs

from . import blockgraph, common, qom, threads, vcpus, waiters
from .target import IntrospectError, NotAvailable, Target

SYS_FUTEX = 202
SYS_RESTART_SYSCALL = 219  # the kernel resumes an interrupted timed wait with it
SYS_IOCTL = 16
KVM_RUN = 0xAE80
FUTEX_WAIT, FUTEX_WAIT_BITSET, FUTEX_LOCK_PI = 0, 9, 6
FUTEX_CMD_MASK = ~(128 | 256)  # FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME
LLL_LOCK_WAIT_VALUE = 2  # glibc lowlevellock: futex_wait(&lock, 2) when contended
PTHREAD_MUTEX_OWNER = 8  # offsetof(pthread_mutex_t, __data.__owner), x86-64 glibc
PTHREAD_MUTEX_COUNT = 4

SYSCALLS = {0: "read", 1: "write", 7: "poll", 16: "ioctl", 17: "pread64", 18: "pwrite64", 19: "readv",
            20: "writev", 23: "select", 35: "nanosleep", 44: "sendto", 45: "recvfrom", 46: "sendmsg",
            47: "recvmsg", 61: "wait4", 202: "futex", 219: "restart_syscall", 208: "io_getevents", 230: "clock_nanosleep",
            232: "epoll_wait", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait", 288: "accept4",
            295: "preadv", 296: "pwritev", 426: "io_uring_enter", 441: "epoll_pwait2"}
POLLS = ("poll", "ppoll", "epoll_wait", "epoll_pwait", "epoll_pwait2", "select", "pselect6", "io_uring_enter")

common.register("locks", "Who holds the BQL and who waits for it, AioContext locks (7.2), what each thread is "
                "blocked on, CoMutexes held", [])


def syscall_of(t: Target, tid: int) -> Optional[tuple[int, list[int]]]:
    """(number, [6 arguments]) of the system call thread tid is in, (-1, []) when it runs user code,
    None when this reader cannot tell."""
    if t.can_read_registers:
        nr = t.register(tid, "orig_rax")
        if nr is not None:
            if nr in (-1, (1 << 64) - 1):
                return -1, []
            args = [t.register(tid, r) or 0 for r in ("rdi", "rsi", "rdx", "r10", "r8", "r9")]
            return nr, args
    if t.kind == "live" and t.pid is not None:
        try:
            sc = procfs.task_syscall(t.pid, tid)
        except (OSError, ValueError):
            return None  # the thread is gone
        if sc is None or sc.nr < 0:  # the kernel says "running", or the thread is in user space
            return -1, []
        return sc.nr, sc.args
    return None


class Objects:
    """Address ranges of the synchronisation objects that have a name (for futex addresses)."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, str, str]] = []
        self._starts: list[int] = []

    def add(self, start: int, size: int, name: str, kind: str) -> None:
        if start:
            self._items.append((start, start + max(size, 1), name, kind))

    def freeze(self) -> None:
        self._items.sort()
        self._starts = [i[0] for i in self._items]

    def find(self, addr: int) -> Optional[tuple[str, str]]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            s, e, name, kind = self._items[i]
            if s <= addr < e:
                return name, kind
        return None


def _bql(t: Target) -> Optional[tuple[str, int, int]]:
    """(name, address, size) of the BQL: bql (9.1+, 10.0) or qemu_global_mutex (7.2)."""
    for name in ("bql", "qemu_global_mutex"):
        v = t.find_var(name) if t.has_debug_info() else None
        if v is not None:
            return name, v.addr, v.type.size
        s = t.symbol(name)
        if s is not None:
            return name, s.address, s.size or 40
    return None


def has_aio_context_locks(t: Target) -> bool:
    """aio_context_acquire() exists up to QEMU 8.2 (7.2: util/async.c); 9.0 removed it."""
    try:
        return t.elf_symbol("aio_context_acquire") is not None
    except IntrospectError:
        return False


def _mutex(t: Target, addr: int) -> dict[str, Any]:
    owner = t.read_s32(addr + PTHREAD_MUTEX_OWNER)
    return {"address": addr, "holder": owner or None, "count": t.read_u32(addr + PTHREAD_MUTEX_COUNT),
            "locked": t.read_s32(addr) != 0}


def collect(t: Target) -> dict[str, Any]:
    qom.forget(t)
    limits = t.memo.setdefault("limits", [])
    objs = Objects()
    bql = _bql(t)
    if bql is not None:
        objs.add(bql[1], bql[2], "BQL", "mutex")
    ctx_locks: list[dict[str, Any]] = []
    aio_locks = has_aio_context_locks(t)
    if t.has_debug_info():
        try:
            for cpu in vcpus.cpu_list(t):
                c = cpu.deref()
                hc = c["halt_cond"].ptr()
                if hc:
                    objs.add(hc, t.type("QemuCond").size, f"vCPU {int(c['cpu_index'])} halt_cond", "cond")
        except IntrospectError as exc:
            limits.append(f"vCPUs not readable: {exc}")
        if aio_locks:
            ctxs = blockgraph.aio_contexts(t)
            for addr, ctx in ctxs.items():
                v = t.value(addr, "AioContext")
                lock = v["lock"]
                objs.add(lock.addr, lock.type.size, f"AioContext lock of {ctx['name']}", "mutex")
                ctx_locks.append({"aio-context": dict(ctx), **_mutex(t, lock.addr)})
    objs.freeze()

    rows: list[dict[str, Any]] = []
    try:
        thr = threads.collect(t)["threads"]
    except IntrospectError as exc:
        limits.append(f"thread roles not readable: {exc}")
        thr = [{"tid": th.tid, "name": th.name, "label": None} for th in t.threads()]
    vcpu_tids: set[int] = set()
    if t.has_debug_info():
        try:
            vcpu_tids = {int(c.deref()["thread_id"]) for c in vcpus.cpu_list(t)}
        except IntrospectError:
            vcpu_tids = set()
    unknown = 0
    for th in thr:
        tid = th["tid"]
        sc = syscall_of(t, tid)
        row: dict[str, Any] = {"tid": tid, "name": th["name"], "label": th.get("label"), "syscall": None,
                               "state": "unknown", "waits-on": None}
        in_kvm_run = bool(sc and sc[0] == SYS_IOCTL and len(sc[1]) > 1 and sc[1][1] == KVM_RUN)
        if th.get("role") == "kvm-kernel" or (in_kvm_run and vcpu_tids and tid not in vcpu_tids):
            # KVM's kernel workers (kvm-nx-lpage-recovery) live in QEMU's thread group with the user
            # registers of the vCPU thread that started them: on a core, without a name, they look
            # like that vCPU in KVM_RUN, but no CPUState runs on them
            row["state"] = "KVM's kernel worker (no QEMU code)"
        elif sc is None:
            unknown += 1
        elif sc[0] == -1:
            row["state"] = "running"
        else:
            nr, args = sc
            name = SYSCALLS.get(nr, f"syscall {nr}")
            row["syscall"] = name
            row["state"] = "in " + name
            if nr == SYS_FUTEX and args:
                addr, op, val = args[0], args[1] & FUTEX_CMD_MASK, args[2] & 0xFFFFFFFF
                found = objs.find(addr)
                sym = None if found else t.symbolize(addr)
                kind = found[1] if found else None
                is_lll = op == FUTEX_WAIT and val == LLL_LOCK_WAIT_VALUE
                if is_lll:
                    kind = "mutex"
                elif kind is None and op == FUTEX_WAIT_BITSET:
                    kind = "cond"
                what: dict[str, Any] = {"address": addr, "object": found[0] if found else sym, "kind": kind or
                                        "futex", "holder": None}
                if kind == "mutex":
                    try:  # the futex word is the mutex's first member
                        what["holder"] = t.read_s32(addr + PTHREAD_MUTEX_OWNER) or None
                    except IntrospectError:
                        pass
                row["waits-on"] = what
                row["state"] = "waits for " + (what["object"] or f"futex {addr:#x}")
            elif nr == SYS_IOCTL and len(args) > 1 and args[1] == KVM_RUN:
                row["state"] = "in KVM_RUN (runs the guest, or waits in the kernel for it)"
            elif name in POLLS:
                row["state"] = "waits for events (" + name + ")"
            elif nr == SYS_RESTART_SYSCALL:  # a timed wait interrupted by a stop (ptrace, SIGSTOP)
                row["state"] = "in a timed wait resumed after a stop (restart_syscall: its object is not visible)"
        rows.append(row)
    if unknown:
        limits.append(f"what {unknown} thread(s) wait on needs their registers, which this reader does not see: "
                      "virtopt gdb PID -c locks (it pauses QEMU) or a core file")

    bql_info: dict[str, Any] = {"known": bql is not None, "name": None, "address": None, "holder": None,
                                "waiters": []}
    if bql is not None:
        m = _mutex(t, bql[1])
        bql_info.update({"name": bql[0], "address": bql[1], "holder": m["holder"],
                         "waiters": [r["tid"] for r in rows if r["waits-on"] and r["waits-on"]["object"] == "BQL"]})
    for lk in ctx_locks:
        name = f"AioContext lock of {lk['aio-context']['name']}"
        lk["waiters"] = [r["tid"] for r in rows if r["waits-on"] and r["waits-on"]["object"] == name]
    co_mutexes: list[dict[str, Any]] = []
    parked = 0
    if t.has_debug_info():
        try:
            co_mutexes = waiters.held_mutexes(t)
            parked = len(waiters.parked(t))
        except (IntrospectError, NotAvailable) as exc:
            limits.append(f"coroutine locks not readable: {exc}")
    return {
        "bql": bql_info,
        "aio-context-locks": {"version-has-them": aio_locks, "locks": ctx_locks},
        "threads": rows,
        "co-mutexes": co_mutexes,
        "parked-coroutines": parked,
    }
