"""`virtopt coroutines`: the coroutines that can be found, and a backtrace of one — no calls into QEMU.

QEMU's `qemu bt` / `qemu coroutine` call arch_prctl() in the inferior to find glibc's
pointer guard; here it is read from the thread's $fs_base (tcbhead_t.pointer_guard at
fs:0x30). Coroutines are found through what QEMU keeps pointers to: each thread's
current coroutine (TLS co_tls_current) and its callers, the block layer's tracked
requests, the AioContexts' scheduled coroutines, and the free pools.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import gdb

from . import block, core

POINTER_GUARD_OFFSET = 0x30  # glibc x86-64 tcbhead_t
JB_RBX, JB_RBP, JB_R12, JB_R13, JB_R14, JB_R15, JB_RSP, JB_PC = range(8)
MAX_POOL = 10000
OUTERMOST = ("__start_context", "start_thread", "clone3", "__clone3")
REGS = ("rip", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15")


def _co_ptr_type() -> gdb.Type:
    return core.CachedType("Coroutine").pointer()


def _describe(co: int, source: str, thread: Optional[int] = None) -> dict[str, Any]:
    c = gdb.Value(co).cast(_co_ptr_type()).dereference()
    entry = core.ptr(c["entry"])
    return {
        "address": co,
        "source": source,
        "thread": thread,
        "entry": core.symbolize(entry) or (f"{entry:#x}" if entry else None),
        "entry-arg": core.ptr(c["entry_arg"]),
        "caller": core.ptr(c["caller"]) or None,
        "locks-held": int(c["locks_held"]),
        "ctx": core.ptr(c["ctx"]) or None,
        "scheduled-by": core.cstr(c["scheduled"]) if core.ptr(c["scheduled"]) else None,
    }


def _tls(name: str, th: gdb.InferiorThread) -> Optional[gdb.Value]:
    """A __thread variable as seen from thread th (needs libthread_db, which gdb loads on attach)."""
    sym = gdb.lookup_static_symbol(name)
    if sym is None:
        return None
    th.switch()
    try:
        return sym.value(gdb.newest_frame())
    except gdb.error:
        try:
            return sym.value()
        except gdb.error:
            return None


def find_coroutines() -> dict[str, Any]:
    found: dict[int, dict[str, Any]] = {}
    notes: list[str] = []

    def add(co: int, source: str, thread: Optional[int] = None) -> None:
        if co and co not in found:
            found[co] = _describe(co, source, thread)

    inf = core.inferior()
    selected = gdb.selected_thread()
    leaders = set()
    try:
        for th in inf.threads():
            tid = th.ptid[1]
            cur = _tls("co_tls_current", th)
            leader = _tls("co_tls_leader", th)
            if leader is not None:
                leaders.add(core.ptr(leader.address))
            if cur is not None and core.ptr(cur):
                c = core.ptr(cur)
                chain = 0
                while c and chain < 64:
                    if c not in leaders:
                        add(c, "running" if chain == 0 else "caller-of-running", tid)
                    c = core.ptr(gdb.Value(c).cast(_co_ptr_type())["caller"])
                    chain += 1
            pool = _tls("co_tls_alloc_pool", th)
            if pool is not None:
                for co in core.qtailq(pool, "pool_next")[:MAX_POOL]:
                    add(core.ptr(co), "alloc-pool", tid)
    finally:
        if selected is not None and selected.is_valid():
            selected.switch()
    for co in list(found):
        if co in leaders:
            del found[co]
    try:
        for bsp in block.bdrv_states():
            for req in core.qtailq(bsp["tracked_requests"], "list"):
                add(core.ptr(req["co"]), f"tracked-request:{core.cstr(bsp['node_name'])}")
    except (core.VirtoptGdbError, gdb.error) as exc:
        notes.append(f"block layer not readable: {exc}")
    for ctx_name in ("qemu_aio_context", "iohandler_ctx"):
        try:
            ctx = core.value_of(ctx_name)
            if core.ptr(ctx):
                for co in core.qtailq(ctx["scheduled_coroutines"], "co_scheduled_next"):
                    add(core.ptr(co), f"scheduled:{ctx_name}")
        except (core.VirtoptGdbError, gdb.error) as exc:
            notes.append(f"{ctx_name} not readable: {exc}")
    try:
        for co in core.qtailq(core.value_of("release_pool"), "pool_next")[:MAX_POOL]:
            add(core.ptr(co), "release-pool")
    except (core.VirtoptGdbError, gdb.error) as exc:
        notes.append(f"release_pool not readable: {exc}")
    order = {"running": 0, "caller-of-running": 1}
    cos = sorted(found.values(), key=lambda c: (order.get(c["source"], 2 if not c["source"].endswith("pool") else 3),
                                                c["address"]))
    return {"coroutines": cos, "notes": notes}


def _pointer_guard() -> int:
    fs_base = int(gdb.parse_and_eval("$fs_base"))
    if not fs_base:
        raise core.VirtoptGdbError("cannot read $fs_base of the selected thread (needed for glibc's pointer guard)")
    return core.read_u64(fs_base + POINTER_GUARD_OFFSET)


def _demangle(v: int, guard: int) -> int:
    v &= (1 << 64) - 1
    return (((v >> 0x11) | (v << (64 - 0x11))) & ((1 << 64) - 1)) ^ guard


def jmpbuf_regs(co: int) -> dict[str, int]:
    """The registers a yielded coroutine resumes with (CoroutineUContext.env), demangled."""
    uc = gdb.Value(co).cast(core.CachedType("CoroutineUContext").pointer()).dereference()
    jb = uc["env"][0]["__jmpbuf"]
    vals = [int(jb[i]) & ((1 << 64) - 1) for i in range(8)]
    guard = _pointer_guard()
    return {
        "rbx": vals[JB_RBX], "rbp": _demangle(vals[JB_RBP], guard), "r12": vals[JB_R12], "r13": vals[JB_R13],
        "r14": vals[JB_R14], "r15": vals[JB_R15], "rsp": _demangle(vals[JB_RSP], guard),
        "rip": _demangle(vals[JB_PC], guard),
    }


def backtrace(co: int, limit: int = 32) -> list[dict[str, Any]]:
    """Unwind a yielded coroutine: load its saved registers into the selected thread's newest frame,
    walk gdb's frames, and put the thread's registers back (all while the process is stopped)."""
    regs = jmpbuf_regs(co)
    if not regs["rsp"] or not regs["rip"]:
        raise core.VirtoptGdbError(f"coroutine {co:#x} has no saved context")
    selected = gdb.selected_frame()
    gdb.newest_frame().select()
    saved = {r: int(gdb.parse_and_eval(f"(unsigned long)${r}")) for r in REGS}
    frames: list[dict[str, Any]] = []
    try:
        for r in REGS:
            gdb.execute(f"set ${r} = {regs[r]:#x}", to_string=True)
        f: Optional[gdb.Frame] = gdb.newest_frame()
        while f is not None and len(frames) < limit and f.pc():
            sal = f.find_sal()
            name = f.name() or core.symbolize(f.pc())
            frames.append({
                "level": len(frames),
                "pc": f.pc(),
                "function": name,
                "file": sal.symtab.filename if sal.symtab else None,
                "line": sal.line or None,
            })
            if name in OUTERMOST:
                break
            try:
                f = f.older()
            except gdb.error:
                break
    finally:
        for r in REGS:
            gdb.execute(f"set ${r} = {saved[r]:#x}", to_string=True)
        gdb.invalidate_cached_frames()
        try:
            selected.select()
        except gdb.error:
            pass
    return frames


@core.needs_debug_info
class CoroutinesCommand(core.VirtoptCommand):
    name = "coroutines"
    summary = ("Coroutines that can be found (running, tracked block requests, scheduled, pools) and a "
               "backtrace of one, without calling functions in QEMU.")
    epilog = ("examples:\n  virtopt coroutines\n  virtopt coroutines --bt 0   (backtrace of the first listed)\n"
              "  virtopt coroutines --bt 0x55d0c0a3f1f0 --json")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--bt", metavar="N|ADDR", help="backtrace of coroutine number N in the list, or at ADDR")
        p.add_argument("--pools", action="store_true", help="also list free coroutines in the pools")

    def collect(self, args: argparse.Namespace) -> Any:
        data = find_coroutines()
        cos = data["coroutines"]
        if args.bt is not None:
            text = args.bt.strip()
            try:
                n = int(text, 0)
            except ValueError as exc:
                raise core.VirtoptGdbError(f"--bt takes a list index or an address, not {text!r}") from exc
            if 0 <= n < len(cos) and not text.lower().startswith("0x"):
                co = cos[n]
            else:
                co = next((c for c in cos if c["address"] == n), None) or _describe(n, "given")
            if co["source"] == "running":
                raise core.VirtoptGdbError(
                    f"coroutine {co['address']:#x} is running: its stack is its thread's (thread {co['thread']}: bt)")
            data["backtrace"] = {"coroutine": co["address"], "frames": backtrace(co["address"])}
        pooled = [c for c in cos if c["source"].endswith("pool")]
        data["pooled"] = len(pooled)
        if not args.pools and args.bt is None:
            data["coroutines"] = [c for c in cos if not c["source"].endswith("pool")]
        return data

    def render(self, d: Any, args: argparse.Namespace) -> None:
        if not d["coroutines"]:
            gdb.write("no coroutine in flight\n")
        for i, c in enumerate(d["coroutines"]):
            thr = f" thread {c['thread']}" if c["thread"] else ""
            gdb.write(f"[{i}] {c['address']:#x} {c['source']}{thr} entry {c['entry']} "
                      f"locks {c['locks-held']}{' caller ' + hex(c['caller']) if c['caller'] else ''}\n")
        if not args.pools and args.bt is None:
            gdb.write(f"{'' if d['coroutines'] else ' '}({d['pooled']} free coroutine(s) in the pools: --pools)\n")
        for n in d["notes"]:
            gdb.write(f"note: {n}\n")
        bt = d.get("backtrace")
        if bt:
            gdb.write(f"coroutine {bt['coroutine']:#x}:\n")
            for f in bt["frames"]:
                loc = f" at {f['file']}:{f['line']}" if f["file"] else ""
                gdb.write(f"  #{f['level']:<2} {f['pc']:#018x} in {f['function'] or '??'}{loc}\n")


def register() -> None:
    CoroutinesCommand()
