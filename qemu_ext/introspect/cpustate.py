"""`cpustate`: each vCPU's guest state as QEMU holds it in CPUArchState (x86: CPUX86State in
X86CPU, target/i386/cpu.h 7.2 and 10.0): RIP, CS and the CPU mode, CR0/CR2/CR3/CR4, EFER, CPL,
halted, exception_index — the fields HMP `info registers` prints (x86_cpu_dump_state,
target/i386/cpu-dump.c).

Under TCG, env is QEMU's own state (exact at translation-block boundaries). Under KVM the live
registers are in the kernel: QEMU's copy is current only after it synchronised them
(cpu_synchronize_state: HMP info registers, a pause for migration, ...) and until the vCPU runs
again — exactly while CPUState.vcpu_dirty is set (kvm_cpu_synchronize_state / kvm_cpu_exec,
accel/kvm/kvm-all.c). The view says which, per vCPU.
"""

from __future__ import annotations

from typing import Any, Optional

from . import common, vcpus
from .target import IntrospectError, Target, Value

R_CS = 1
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")
HF_CPL_MASK = 3
HF_INHIBIT_IRQ_SHIFT = 3
HF_LMA_SHIFT, HF_CS64_SHIFT, HF_SMM_SHIFT = 14, 15, 19
DESC_B_SHIFT, DESC_L_SHIFT = 22, 21
CR0_PE, EFER_LMA, EFLAGS_VM = 1, 1 << 10, 1 << 17
EXCP_INTERRUPT, EXCP_HLT, EXCP_DEBUG, EXCP_HALTED, EXCP_YIELD = 0x10000, 0x10001, 0x10002, 0x10003, 0x10004
EXCEPTIONS = {-1: None, 0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
              10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM",
              EXCP_INTERRUPT: "EXCP_INTERRUPT", EXCP_HLT: "EXCP_HLT", EXCP_DEBUG: "EXCP_DEBUG",
              EXCP_HALTED: "EXCP_HALTED", EXCP_YIELD: "EXCP_YIELD"}


def _x86(t: Target, view: str) -> Optional[str]:
    if t.find_type("CPUX86State") is None:
        return f"virtopt {view} reads x86 guest state (CPUX86State) and this QEMU has no such type in its debug info"
    return None


common.register("cpustate", "Guest vCPU state from CPUArchState (x86: RIP, CS/mode, CR0/CR3/CR4, EFER, halted, "
                "exception), and whether QEMU's copy is current under KVM", [common.needs_debug_info, _x86])


def mode(cr0: int, efer: int, cs_flags: int, eflags: int) -> str:
    """The x86 operating mode from CR0.PE, EFER.LMA, the CS descriptor's L/D bits and EFLAGS.VM."""
    if not cr0 & CR0_PE:
        return "real"
    if efer & EFER_LMA:
        if cs_flags & (1 << DESC_L_SHIFT):
            return "64-bit"
        return "compatibility 32-bit" if cs_flags & (1 << DESC_B_SHIFT) else "compatibility 16-bit"
    if eflags & EFLAGS_VM:
        return "virtual-8086"
    return "protected 32-bit" if cs_flags & (1 << DESC_B_SHIFT) else "protected 16-bit"


def _seg(s: Value) -> dict[str, int]:
    return {"selector": int(s["selector"]), "base": int(s["base"]), "limit": int(s["limit"]),
            "flags": int(s["flags"])}


def one(t: Target, cpu: Value, accel: str) -> dict[str, Any]:
    c = cpu.deref()
    env = t.value(cpu.ptr(), "X86CPU")["env"]  # X86CPU (struct ArchCPU) starts with its CPUState
    segs = {n: _seg(env["segs"].index(i)) for i, n in enumerate(SEG_NAMES)}
    cr = [int(env["cr"].index(i)) for i in range(5)]
    efer, hflags, eflags = int(env["efer"]), int(env["hflags"]), int(env["eflags"])
    exc = int(c["exception_index"])
    dirty = c["vcpu_dirty"].bool() if c.has("vcpu_dirty") else None
    if accel == "kvm":
        current = bool(dirty)
        why = ("QEMU synchronised the registers from KVM and the vCPU has not run since (vcpu_dirty)" if current else
               "KVM holds the live registers; QEMU's copy is from the last synchronisation (HMP info registers "
               "or a pause synchronises them)")
    else:
        current, why = True, "TCG: QEMU's copy is the state (exact at translation-block boundaries)"
    return {
        "cpu-index": int(c["cpu_index"]),
        "thread-id": int(c["thread_id"]),
        "rip": int(env["eip"]),
        "rflags": eflags,
        "cs": segs["cs"],
        "segments": segs,
        "mode": mode(cr[0], efer, segs["cs"]["flags"], eflags),
        "cpl": hflags & HF_CPL_MASK,
        "smm": bool(hflags >> HF_SMM_SHIFT & 1),
        "cr0": cr[0], "cr2": cr[2], "cr3": cr[3], "cr4": cr[4],
        "efer": efer,
        "hflags": hflags,
        "halted": c["halted"].bool(),
        "exception-index": exc,
        "exception": EXCEPTIONS.get(exc, f"vector {exc}" if 0 <= exc < 256 else str(exc)),
        "interrupt-request": int(c["interrupt_request"]),
        "vcpu-dirty": dirty,
        "registers-current": current,
        "registers-source": why,
    }


def collect(t: Target, cpu: Optional[int] = None) -> dict[str, Any]:
    accel = common.accelerator(t)
    out = [one(t, c, accel) for c in vcpus.cpu_list(t)]
    if cpu is not None:
        out = [c for c in out if c["cpu-index"] == cpu]
        if not out:
            raise IntrospectError(f"no vCPU {cpu} in this QEMU")
    return {"accelerator": accel, "vcpus": out}
