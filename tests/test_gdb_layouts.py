"""Issue 11, the gdb part: structures are read by the running QEMU's layout.

- The hand-made layouts used on stripped builds (struct TraceEvent, the timer structures) equal
  what each debug build's DWARF says, series by series (7.2 and 10.0).
- A stripped QEMU whose version cannot be confirmed (a build reporting an unverified version) is
  refused in one line by both readers (gdb and `virtopt inspect`), while the views that need no
  layout still work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from conftest import _require
from gdb_util import PACK, start
from helpers import virtopt

from qemu_ext import vm
from qemu_ext.introspect import layouts

GDB_LAYOUT = """python
import gdb, json
out = {}
for name in %r:
    t = gdb.lookup_type(name).strip_typedefs()
    fields = {}
    for f in t.fields():
        fields[f.name] = [f.bitpos // 8, f.type.strip_typedefs().sizeof]
    out[name] = {"size": t.sizeof, "fields": fields}
print("LAYOUT " + json.dumps(out))
end"""


def test_hand_made_layouts_equal_each_debug_builds_dwarf(debug_build, tmp_path: Path):
    hand = layouts.hand_made(debug_build.series)
    script = tmp_path / "layout.gdb"
    script.write_text(GDB_LAYOUT % (list(hand),))
    cp = subprocess.run(["gdb", "-q", "-nx", "-batch", debug_build.system, "-x", str(script)],
                        capture_output=True, text=True, timeout=120)
    line = next(ln for ln in cp.stdout.splitlines() if ln.startswith("LAYOUT "))
    dwarf = json.loads(line[len("LAYOUT "):])
    for name, ty in hand.items():
        d = dwarf[name]
        if ty.size:
            assert ty.size == d["size"], name
        for fname, f in ty.fields.items():
            assert fname in d["fields"], f"{name}.{fname} is not in {debug_build.label}'s DWARF"
            off, size = d["fields"][fname]
            assert (f.bitpos // 8, f.type.size) == (off, size), f"{name}.{fname} on {debug_build.label}"
    # the one real difference between the series: TraceEvent.vcpu_id went away after 7.2
    assert ("vcpu_id" in dwarf["TraceEvent"]["fields"]) == (debug_build.series == "7.2")


def _patched_qemu(build: vm.QemuBuild, dest: Path) -> Path:
    """A copy of a stripped QEMU whose version string says 9.9 (a series no layout was checked for)."""
    data = Path(build.system).read_bytes()
    old = f"QEMU emulator version {build.series}.".encode()
    assert old in data
    exe = dest / "qemu-system-x86_64"
    exe.write_bytes(data.replace(old, b"QEMU emulator version 9.9."[:len(old)].ljust(len(old), b"9")))
    exe.chmod(0o755)
    return exe


def test_unconfirmed_layout_is_refused_in_one_line(tmp_path: Path):
    build = _require("10.0", debug=False)
    exe = _patched_qemu(build, tmp_path)
    qp = start(str(exe), name="virtopt-unverified", extra_args=build.firmware_args())
    try:
        for view in ("trace list", "timers"):
            cp = virtopt("inspect", str(qp.pid), *view.split())
            assert cp.returncode == 2 and cp.stdout == "", cp.stderr
            (line,) = cp.stderr.splitlines()
            assert "cannot confirm" in line and "verified layouts: QEMU 7.2, 10.0" in line, line
        ok = virtopt("inspect", str(qp.pid), "threads", "--json")
        assert ok.returncode == 0, ok.stderr
        gdb = subprocess.run(["gdb", "-q", "-nx", "-batch", "-p", str(qp.pid), "-ex", f"source {PACK}",
                              "-ex", "virtopt trace list", "-ex", "virtopt info"],
                             capture_output=True, text=True, timeout=60)
        errs = [ln for ln in gdb.stderr.splitlines() if ln.startswith("virtopt trace list")]
        assert len(errs) == 1 and "cannot confirm" in errs[0], gdb.stderr
        assert "trace list     no: " in gdb.stdout and "timers         no: " in gdb.stdout
        assert "threads        ok" in gdb.stdout
        assert qp.alive()
    finally:
        qp.stop()
    shutil.rmtree(tmp_path, ignore_errors=True)
