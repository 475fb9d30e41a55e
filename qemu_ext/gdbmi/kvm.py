"""KVM facts the gdb commands need without headers or debug info."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# KVM_EXIT_* from <linux/kvm.h> (QEMU 7.2's linux-headers, plus 38-39 from QEMU 10.0's); exit_reason is a __u32 at offset 8 of struct kvm_run.
KVM_EXIT_REASONS: dict[int, str] = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR", 12: "TPR_ACCESS",
    13: "S390_SIEIC", 14: "S390_RESET", 15: "DCR", 16: "NMI", 17: "INTERNAL_ERROR", 18: "OSI",
    19: "PAPR_HCALL", 20: "S390_UCONTROL", 21: "WATCHDOG", 22: "S390_TSCH", 23: "EPR",
    24: "SYSTEM_EVENT", 25: "S390_STSI", 26: "IOAPIC_EOI", 27: "HYPERV", 28: "ARM_NISV",
    29: "X86_RDMSR", 30: "X86_WRMSR", 31: "DIRTY_RING_FULL", 32: "AP_RESET_HOLD", 33: "X86_BUS_LOCK",
    34: "XEN", 35: "RISCV_SBI", 36: "RISCV_CSR", 37: "NOTIFY", 38: "LOONGARCH_IOCSR", 39: "MEMORY_FAULT",
}
KVM_RUN_EXIT_REASON_OFFSET = 8


def exit_reason_name(code: Optional[int]) -> Optional[str]:
    if code is None:
        return None
    return KVM_EXIT_REASONS.get(code, f"#{code}")


def exit_reasons_from_header(path: Path) -> dict[int, str]:
    """Parse ``#define KVM_EXIT_<NAME> <n>`` from a kvm.h (tests compare it with the table above)."""
    out: dict[int, str] = {}
    pat = re.compile(r"^#define\s+KVM_EXIT_([A-Z0-9_]+)\s+(\d+)\b")
    skip_prefixes = ("HYPERV_", "XEN_", "IO_")  # sub-codes of other exits share the prefix
    for line in path.read_text(errors="replace").splitlines():
        mo = pat.match(line)
        if mo and not (mo.group(1).startswith(skip_prefixes) and mo.group(1) not in ("HYPERV", "XEN", "IO")):
            out.setdefault(int(mo.group(2)), mo.group(1))
    return out
