"""Helpers for the QMP shell tests: the real REPL on prompt-toolkit pipe input (in a thread), the real
script runner in-process, the checkout launcher as a subprocess, and the shell in a real terminal (tmux)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from helpers import REPO

from qemu_ext.qmp.shell import Shell, ShellOptions

LAUNCHER = REPO / "qmp" / "virtopt-shell"


def connect_ctl(path: Path, timeout: float = 15.0):
    """A sync QMP client (qemu.qmp's legacy one: the ground truth) on an extra -qmp socket."""
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


def hmp(ctl, line: str) -> str:
    return ctl.cmd("human-monitor-command", **{"command-line": line})


def json_lines(text: str) -> list[Any]:
    """The lines that are JSON documents (replies, events in scripts), in order."""
    out = []
    for ln in text.splitlines():
        if ln.startswith(("{", "[")):
            try:
                out.append(json.loads(ln))
            except ValueError:  # an event line at the prompt: "[12:00:01.123] event STOP"
                continue
    return out


def shell_cmd(address: str, *args: str, timeout: float = 60, env: Optional[dict] = None,
              input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run qmp/virtopt-shell (the checkout launcher) the way a user would."""
    e = dict(os.environ)
    e.pop("VIRTOPT_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, str(LAUNCHER), address, "--history", "", *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/", env=e, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


def run_lines(address: str, *lines: str, **opts: Any) -> tuple[int, str, str]:
    """The shell's script mode (what -c and piped lines run) in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    opts.setdefault("history", None)
    opts.setdefault("timeout", 30.0)
    shell = Shell(ShellOptions(address=address, **opts), stdout=out, stderr=err)
    rc = asyncio.run(shell.run_script(list(lines)))
    return rc, out.getvalue(), err.getvalue()


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
        self._closed = False
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

    def menu(self) -> Optional[list[str]]:
        """The completion menu's entries while it is open, else None."""
        ps = self.shell.prompt_session
        st = ps.default_buffer.complete_state if ps is not None else None
        return [c.text for c in st.completions] if st is not None else None

    def selected(self) -> Optional[int]:
        ps = self.shell.prompt_session
        st = ps.default_buffer.complete_state if ps is not None else None
        return st.complete_index if st is not None else None

    def wait_until(self, pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            time.sleep(0.02)
        raise AssertionError(f"never: {what}; input line {self.typed()!r}, menu {self.menu()}, output:\n{self.text()}")

    def wait_typed(self, expected: str, timeout: float = 10.0) -> None:
        self.wait_until(lambda: self.typed() == expected, f"input line {expected!r}", timeout)

    def wait_prompt(self, timeout: float = 20.0) -> None:
        """Until the prompt waits for input (the previous line finished)."""
        self.wait_until(lambda: self.shell.prompt_session is not None and self.shell.prompt_session.app.is_running
                        and self.shell._current is None, "a prompt", timeout)

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

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 15.0) -> None:
        self._thread.join(timeout)

    def close(self) -> int:
        if self._closed:
            return int(self.rc or 0)
        self._closed = True
        if self._thread.is_alive():
            self.send("\x15")  # Ctrl-U: an empty line, so that Ctrl-D quits
            time.sleep(0.05)
            self.send("\x04")  # Ctrl-D
            self._thread.join(15)
        self._pipe_cm.__exit__(None, None, None)
        if self.exc is not None:
            raise self.exc
        assert not self._thread.is_alive(), "the shell did not exit on Ctrl-D"
        return int(self.rc or 0)


class Tmux:
    """The shell (or any command) in a real terminal: a private tmux server, one window of WxH."""

    def __init__(self, argv: list[str], width: int = 100, height: int = 30, env: Optional[dict] = None,
                 cwd: str = "/") -> None:
        if shutil.which("tmux") is None:
            raise RuntimeError("tmux is not installed (apt-get install tmux)")
        self.sock = f"virtopt-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        e = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        e.update(env or {})
        e.setdefault("TERM", "xterm-256color")
        cmd = " ".join(_quote(a) for a in argv)
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), "-c", cwd,
                   f"{cmd}; echo EXIT=$?; sleep 30", env=e)
        self._tmux("set-option", "-s", "escape-time", "0")  # Escape reaches the program at once

    def _tmux(self, *args: str, env: Optional[dict] = None) -> str:
        cp = subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", *args], capture_output=True, text=True,
                            env=env, timeout=20)
        if cp.returncode:
            raise RuntimeError(f"tmux {args[0]}: {cp.stderr.strip()}")
        return cp.stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)

    def type(self, text: str) -> None:
        self.keys(text, literal=True)

    def paste(self, text: str) -> None:
        """A real paste: tmux wraps it in bracketed-paste markers when the program asked for them."""
        self._tmux("set-buffer", "-b", "p", text)
        self._tmux("paste-buffer", "-p", "-d", "-b", "p", "-t", "t")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def history(self) -> str:
        """Everything the pane showed, scrollback included."""
        return self._tmux("capture-pane", "-p", "-S", "-", "-t", "t")

    def wait(self, pred: Callable[[str], bool], what: str, timeout: float = 20.0, full: bool = False) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.history() if full else self.screen()
            if pred(text):
                return text
            time.sleep(0.05)
        raise AssertionError(f"terminal never showed {what}; it shows:\n{text}")

    def wait_text(self, needle: str, timeout: float = 20.0, full: bool = False) -> str:
        return self.wait(lambda t: needle in t, repr(needle), timeout, full)

    def close(self) -> None:
        """Stop this private tmux server (and the program in it) and remove its socket file."""
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)
        base = os.environ.get("TMUX_TMPDIR") or "/tmp"
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(base, f"tmux-{os.getuid()}", self.sock))


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def launcher_argv(address: str, *args: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), address, *args]
