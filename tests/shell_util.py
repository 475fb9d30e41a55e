"""Helpers for the QMP shell tests: run the real REPL on prompt-toolkit pipe input in a thread."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from helpers import REPO

from qemu_ext.qmp.shell import Shell, ShellOptions

LAUNCHER = REPO / "qmp" / "virtopt-shell"


def connect_ctl(path: Path, timeout: float = 15.0):
    """A sync QMP client on an extra -qmp socket of a QEMU that start_qemu just started.

    start_qemu waits for the first monitor only; a later one may exist but not listen yet (refused)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + timeout
    while True:
        client = QEMUMonitorProtocol(str(path))
        try:
            client.connect()
        except Exception:
            client.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        client.settimeout(30)
        return client


def shell_cmd(address: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run qmp/virtopt-shell (the checkout launcher) the way a user would."""
    return subprocess.run([sys.executable, str(LAUNCHER), address, "--history", "", "--timeout", "30", *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


class Repl:
    """The interactive shell fed through create_pipe_input(), printing into a buffer."""

    def __init__(self, address: str, **opts: object) -> None:
        from prompt_toolkit.input import create_pipe_input
        from prompt_toolkit.output import DummyOutput

        self.out = io.StringIO()
        self.err = io.StringIO()
        opts.setdefault("history", None)
        opts.setdefault("timeout", 30.0)
        self.shell = Shell(ShellOptions(address=address, **opts), stdout=self.out, stderr=self.err)  # type: ignore[arg-type]
        self._pipe_cm = create_pipe_input()
        self.pipe = self._pipe_cm.__enter__()
        self._output = DummyOutput()
        self.rc: Optional[int] = None
        self.exc: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.rc = asyncio.run(self.shell.repl(input=self.pipe, output=self._output))
        except BaseException as exc:  # reported by close()
            self.exc = exc

    def send(self, text: str) -> None:
        self.pipe.send_text(text)

    def typed(self) -> str:
        """What is in the input line right now (after completion inserted text)."""
        ps = self.shell.prompt_session
        return ps.default_buffer.text if ps is not None else ""

    def wait_typed(self, expected: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.typed() != expected:
            time.sleep(0.02)
        assert self.typed() == expected, f"input line is {self.typed()!r}, expected {expected!r}"

    def text(self) -> str:
        return self.out.getvalue() + self.err.getvalue()

    def wait_for(self, pred: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.text()
            if pred(t):
                return t
            if not self._thread.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"shell output never matched; got:\n{self.text()}\nexc={self.exc!r}")

    def wait_line(self, needle: str, timeout: float = 20.0) -> str:
        return self.wait_for(lambda t: needle in t, timeout)

    def close(self) -> int:
        if self._thread.is_alive():
            self.send("\x04")  # Ctrl-D
            self._thread.join(15)
        self._pipe_cm.__exit__(None, None, None)
        if self.exc is not None:
            raise self.exc
        assert not self._thread.is_alive(), "the shell did not exit on Ctrl-D"
        return int(self.rc or 0)


def sock_path(p: Path) -> str:
    return str(p)
