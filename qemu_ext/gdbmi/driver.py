"""Drive gdb through pygdbmi: attach to a pid, source the virtopt pack, run commands, detach.

gdb only reads (and for `trace`, writes) QEMU's memory; it never calls into the process,
and it always detaches (QEMU keeps running) — also when a command fails or times out.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from qemu_ext.errors import NotAvailableError, QemuError, VirtoptError

#: first words that are virtopt gdb commands (so `-c threads` means `virtopt threads`)
JSON_MARKER = "@virtopt-json-file "  # what the pack prints instead of JSON when virtopt-json-dir is set
VIRTOPT_COMMANDS = ("info", "threads", "vcpus", "mtree", "timers", "trace", "qcow2", "coroutines")


def pack_path() -> Path:
    """The gdb pack users `source`: $VIRTOPT_GDB_PACK, gdb/virtopt-gdb.py beside this qemu_ext
    (a checkout), or <prefix>/share/virtopt/gdb/virtopt-gdb.py (an installed virtualenv)."""
    here = Path(__file__).resolve()
    cands = [Path(os.environ["VIRTOPT_GDB_PACK"])] if os.environ.get("VIRTOPT_GDB_PACK") else []
    cands += [here.parent.parent.parent / "gdb" / "virtopt-gdb.py",
              Path(sys.prefix) / "share" / "virtopt" / "gdb" / "virtopt-gdb.py"]
    for cand in cands:
        if cand.is_file():
            return cand
    raise NotAvailableError(f"the virtopt gdb pack is not installed (looked for {', '.join(map(str, cands))})")


@dataclass
class GdbResult:
    """What one console command printed, and gdb's error line when it failed."""

    command: str
    ok: bool
    output: str
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def data(self) -> Any:
        """The JSON the command printed (commands run with --json), else None."""
        try:
            return json.loads(self.output)
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "ok": self.ok, "data": self.data,
                "output": self.output, "error": self.error, "seconds": round(self.seconds, 4)}

    def raise_for_error(self) -> None:
        if not self.ok:
            raise error_for(self.error or "gdb command failed")


def error_for(message: str) -> VirtoptError:
    """The VirtoptError (and so the exit code) matching a gdb error line."""
    low = message.lower()
    if "needs qemu's debug info" in low or "is not qemu" in low or " needs " in low or "not available" in low:
        return NotAvailableError(message)
    return QemuError(message)


def normalize(command: str) -> str:
    """`threads --json` -> `virtopt threads --json`; anything else is passed to gdb as is."""
    c = command.strip()
    first = c.split(None, 1)[0] if c else ""
    return f"virtopt {c}" if first in VIRTOPT_COMMANDS else c


def _mi_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


@dataclass
class GdbSession:
    """One gdb attached to pid with the virtopt pack loaded. Use as a context manager."""

    pid: int
    gdb: str = "gdb"
    timeout: float = 30.0
    pack: Optional[Path] = None
    _ctl: Any = None
    _token: int = 100
    _json_dir: Optional[str] = None
    log: list = field(default_factory=list)

    def __enter__(self) -> GdbSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self.pid <= 0:
            raise QemuError(f"not a process id: {self.pid}")
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            raise QemuError(f"no process with pid {self.pid}") from None
        except PermissionError:
            pass  # gdb will say whether it may attach
        exe = shutil.which(self.gdb)
        if exe is None:
            raise NotAvailableError(f"{self.gdb} not found: apt-get install gdb")
        try:
            from pygdbmi.gdbcontroller import GdbController
        except ImportError as exc:
            raise NotAvailableError("pygdbmi is not installed: pip install pygdbmi") from exc
        pack = self.pack or pack_path()
        self._ctl = GdbController(command=[exe, "-q", "-nx", "--interpreter=mi3"],
                                  time_to_check_for_additional_output_sec=0.005)
        try:
            res = self.mi(f"-target-attach {self.pid}")
            if not res.ok:
                raise QemuError(f"gdb cannot attach to pid {self.pid}: {res.error}")
            res = self.console(f"source {pack}")
            if not res.ok or "did not load" in res.output:
                raise QemuError(f"the virtopt gdb pack did not load: {res.error or res.output.strip()}")
            # large JSON through MI console records is slow: let the pack hand it over in files
            self._json_dir = tempfile.mkdtemp(prefix="virtopt-gdb-")
            self.console(f"set virtopt-json-dir {self._json_dir}")
        except BaseException:
            self.close()
            raise

    def mi(self, command: str, timeout: Optional[float] = None) -> GdbResult:
        """Send one MI command and wait for its result record; console output is collected."""
        if self._ctl is None:
            raise QemuError("gdb is not running")
        self._token += 1
        token = self._token
        t0 = time.monotonic()
        deadline = t0 + (timeout or self.timeout)
        self._ctl.write(f"{token}{command}", read_response=False)
        out: list[str] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"gdb did not answer {command!r} within {timeout or self.timeout:.0f} s")
            try:
                records = self._ctl.get_gdb_response(timeout_sec=min(left, 0.5), raise_error_on_timeout=False)
            except Exception as exc:  # gdb died (pygdbmi raises on a closed pipe)
                raise QemuError(f"gdb stopped while running {command!r}: {exc}") from exc
            for r in records:
                self.log.append(r)
                if r.get("type") == "console" and r.get("payload") is not None:
                    out.append(r["payload"])
                elif r.get("type") == "result" and r.get("token") == token:
                    ok = r.get("message") != "error"
                    err = None
                    if not ok:
                        payload = r.get("payload") or {}
                        err = payload.get("msg") if isinstance(payload, dict) else str(payload)
                        err = "; ".join(ln.strip() for ln in str(err).splitlines() if ln.strip())
                    return GdbResult(command, ok, "".join(out), err, time.monotonic() - t0)
            if self._ctl.gdb_process.poll() is not None:
                raise QemuError(f"gdb exited while running {command!r}")

    def console(self, command: str, timeout: Optional[float] = None) -> GdbResult:
        """Run a CLI command (e.g. `virtopt threads --json`) and return what it printed."""
        res = self.mi(f"-interpreter-exec console {_mi_quote(command)}", timeout)
        res.command = command
        if self._json_dir and JSON_MARKER in res.output:
            res.output = self._take_json_files(res.output)
        return res

    def _take_json_files(self, output: str) -> str:
        parts = []
        for line in output.splitlines(keepends=True):
            if line.startswith(JSON_MARKER):
                path = Path(line[len(JSON_MARKER):].strip())
                if path.parent == Path(self._json_dir or ""):
                    try:
                        parts.append(path.read_text())
                        path.unlink()
                        continue
                    except OSError:
                        pass
            parts.append(line)
        return "".join(parts)

    def run(self, command: str, timeout: Optional[float] = None) -> GdbResult:
        return self.console(normalize(command), timeout)

    def close(self) -> None:
        if self._json_dir:
            shutil.rmtree(self._json_dir, ignore_errors=True)
            self._json_dir = None
        ctl, self._ctl = self._ctl, None
        if ctl is None:
            return
        try:
            if ctl.gdb_process.poll() is None:
                self._ctl = ctl
                try:
                    self.mi("-target-detach", timeout=10)
                    ctl.write("-gdb-exit", read_response=False)
                except VirtoptError:
                    pass
                finally:
                    self._ctl = None
        finally:
            try:
                ctl.gdb_process.wait(timeout=2)
            except Exception:  # still running: exit() kills it
                pass
            ctl.exit()


def run_commands(pid: int, commands: Sequence[str], gdb: str = "gdb", timeout: float = 30.0) -> list[GdbResult]:
    """Attach once, run every command (virtopt sub-commands or plain gdb commands), detach."""
    with GdbSession(pid, gdb=gdb, timeout=timeout) as s:
        return [s.run(c) for c in commands]


def query(pid: int, command: str, *args: str, gdb: str = "gdb", timeout: float = 30.0) -> Any:
    """The data of one `virtopt COMMAND ARGS --json` in QEMU pid; raises VirtoptError on failure."""
    line = " ".join(["virtopt", command, *args, "--json"])
    (res,) = run_commands(pid, [line], gdb=gdb, timeout=timeout)
    res.raise_for_error()
    data = res.data
    if data is None:
        raise QemuError(f"{line}: gdb printed no JSON: {res.output.strip()[:200]}")
    return data
