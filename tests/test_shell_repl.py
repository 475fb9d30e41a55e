"""The interactive shell as a person meets it, on real QEMU 7.2 and 10.0: keys through prompt-toolkit's
pipe input (the real REPL, in-process) and through a real terminal (tmux) where the terminal matters
(paste, Escape, the pager, refresh in place, Ctrl-C, exit status)."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest
from shell_util import Repl, Tmux, connect_ctl, json_lines, launcher_argv, run_lines

DOWN = "\x1b[B"
UP = "\x1b[A"
CTRL_C, CTRL_D, CTRL_R = "\x03", "\x04", "\x12"


def paste(text: str) -> str:
    return f"\x1b[200~{text}\x1b[201~"


@pytest.fixture(scope="module")
def vm(module_qemu_factory, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("replvm")
    ctl = d / "ctl.sock"
    qp = module_qemu_factory(name="replvm", smp=2, extra_args=["-qmp", f"unix:{ctl},server=on,wait=off"])
    qp.ctl = connect_ctl(ctl)  # type: ignore[attr-defined]
    qp.addr = str(qp.qmp_path)  # type: ignore[attr-defined]
    yield qp
    qp.ctl.close()


def events(vm) -> list[str]:
    """Events QEMU sent to the test's own monitor since the last call."""
    out = [e["event"] for e in vm.ctl.get_events(wait=False)]
    vm.ctl.clear_events()
    return out


@pytest.fixture
def repl(vm):
    opened: list[Repl] = []

    def start(**opts) -> Repl:
        r = Repl(vm.addr, **opts)
        opened.append(r)
        r.wait_prompt()
        return r

    events(vm)
    yield start
    for r in opened:
        r.close()


def test_tab_tab_enter_never_runs_an_unseen_command(vm, repl):
    r = repl()
    r.send("system_\t")
    r.wait_until(lambda: r.menu() == ["system_powerdown", "system_reset", "system_wakeup"], "the menu")
    r.send("\t")  # a readline user's second Tab: the menu stays, nothing is picked
    time.sleep(0.3)
    assert r.selected() is None and r.typed() == "system_"
    r.send("\r")  # Enter runs what is on the line, as shown: "system_", which QEMU does not have
    r.wait_line("error: QEMU has no command 'system_'; did you mean")
    assert vm.ctl.cmd("query-status")["running"] is True and events(vm) == []
    # an entry picked with the arrows: Enter takes it into the line and runs nothing
    r.wait_prompt()
    r.send("system_\t")
    r.wait_until(lambda: r.menu() is not None, "the menu")
    r.send(DOWN)
    r.wait_typed("system_powerdown")
    r.send("\r")
    r.wait_until(lambda: r.menu() is None, "the menu to close")
    time.sleep(0.3)
    assert r.typed() == "system_powerdown" and events(vm) == [] and "Send it?" not in r.text()


def test_escape_closes_the_menu_and_restores_the_line(repl):
    r = repl()
    r.send("query-bl\t")
    r.wait_until(lambda: r.menu() is not None and len(r.menu()) > 1, "the menu")
    r.send(DOWN)
    r.wait_until(lambda: r.selected() == 0, "an entry picked")
    r.send("\x1b")
    r.wait_until(lambda: r.menu() is None, "Escape to close the menu")
    assert r.typed() == "query-block"  # the common prefix Tab inserted, not the entry


def test_pasted_lines_run_one_by_one_and_stop_at_the_first_error(vm, repl):
    r = repl()
    r.send(paste("stop\ncont\n"))
    r.wait_for(lambda t: json_lines(t).count({"return": {}}) == 2)
    assert vm.ctl.cmd("query-status")["running"] is True and events(vm) == ["STOP", "RESUME"]
    assert "(QEMU replvm) cont" in r.text()  # each pasted line is shown as it runs
    r.wait_prompt()
    r.send(paste("query-name\nno-such-command\nstop\nquery-sta"))
    r.wait_line("stopped at the error: 1 pasted line(s) not run")
    assert {"return": {"name": "replvm"}} in json_lines(r.text())
    assert vm.ctl.cmd("query-status")["running"] is True  # 'stop' after the error did not run
    r.wait_typed("query-sta")  # the unfinished last line waits in the input line


def test_json_output_prints_qmp_errors_as_qemu_sends_them(vm, repl):
    truth = vm.ctl.cmd_obj({"execute": "device_del", "arguments": {"id": "nosuch"}})
    r = repl(output="json")
    r.send("device_del id=nosuch\n")
    r.wait_for(lambda t: "error" in t)
    time.sleep(0.1)
    assert json_lines(r.out.getvalue()) == [{"error": truth["error"]}] and r.err.getvalue() == ""


def test_transaction_completion_and_ctrl_c_ctrl_d_say_what_was_dropped(vm, repl):
    r = repl()
    r.send("transaction(\n")
    r.wait_until(lambda: r.shell.parser.in_transaction, "transaction mode")
    r.send("ab\t")
    r.wait_typed("abort")
    r.send(CTRL_C)
    r.wait_line("Ctrl-C: transaction cancelled, nothing sent; no action was pending")
    r.wait_prompt()
    r.send("transaction(\nblock-dirty-bitmap-add node=nosuch name=t1\nabort\n")
    r.wait_until(lambda: len(r.shell.parser.actions) == 2, "two pending actions")
    r.send(CTRL_D)
    r.wait_line("Ctrl-D: transaction cancelled, nothing sent; 2 action(s) dropped (block-dirty-bitmap-add, abort)")
    assert r.alive() and not r.shell.parser.in_transaction  # Ctrl-D left the transaction, not the shell
    assert r.shell.prompt_text() == "(QEMU replvm) "


def test_commands_that_end_or_reset_the_guest_ask_first(vm, repl):
    r = repl()
    for cmd in ("quit", "system_reset", "system_powerdown"):
        r.send(f"{cmd}\n")
        time.sleep(0.3)
        assert events(vm) == []  # nothing sent while the question waits
        r.send("n\n")
        r.wait_line(f"{cmd} not sent")
        r.wait_prompt()
    assert vm.alive() and vm.ctl.cmd("query-status")["running"] is True
    r.send("system_reset\n")
    time.sleep(0.2)
    r.send("y\n")
    r.wait_for(lambda t: json_lines(t).count({"return": {}}) == 1)
    assert "RESET" in events(vm)
    r.close()  # QEMU serves one client per monitor
    # --yes, and scripts (-c, piped lines), run them as given (one at a time: QEMU merges pending resets)
    r2 = repl(yes=True)
    r2.send("system_reset\n")
    r2.wait_for(lambda t: {"return": {}} in json_lines(t))
    r2.close()
    wait_event(vm, "RESET")
    rc, _, err = run_lines(vm.addr, "system_reset")
    assert rc == 0, err
    wait_event(vm, "RESET")


def wait_event(vm, name: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while name not in events(vm):
        assert time.monotonic() < deadline, f"QEMU sent no {name} event"
        time.sleep(0.05)


def test_help_and_command_help(vm, repl):
    r = repl()
    r.send("help\n")
    r.wait_line("/trace list|on|off|capture")
    r.send("query-stats ?\n")
    r.wait_line("arguments:")
    r.wait_for(lambda t: re.search(r"^  target\s+enum, required$", t, re.M) is not None)
    r.send("/help /mtree\n")
    r.wait_line("usage: /mtree")


def test_history_is_private_and_searched_by_prefix_and_ctrl_r(vm, repl, tmp_path: Path):
    hist = tmp_path / "history"
    r = repl(history=str(hist))
    assert stat.S_IMODE(hist.stat().st_mode) == 0o600  # commands can hold secrets
    for i, line in enumerate(("query-name", "query-status", "query-version")):
        r.send(line + "\n")
        r.wait_for(lambda t, n=i + 1: t.count('{"return"') == n)
        r.wait_prompt()
    n0 = r.text().count('{"return"')
    r.send("query-n")
    r.wait_typed("query-n")
    r.send(UP)
    r.wait_typed("query-name")  # Up: the newest line starting with what is typed
    r.send(CTRL_C)
    r.wait_prompt()
    r.send(CTRL_R + "stat")
    time.sleep(0.3)
    r.send("\r")  # Enter in the search runs the found line
    r.wait_for(lambda t: t.count('{"return"') == n0 + 1)
    assert json_lines(r.text())[-1] == {"return": vm.ctl.cmd("query-status")}
    # an existing history file readable by others is made private
    other = tmp_path / "old-history"
    other.write_text("\n# 2024\n+query-name\n")
    other.chmod(0o644)
    r.close()
    repl(history=str(other))
    assert stat.S_IMODE(other.stat().st_mode) == 0o600


def test_prompt_names_the_vm_and_events_have_readable_times(vm, repl):
    r = repl()
    assert r.shell.prompt_text() == "(QEMU replvm) " and "VM replvm" in r.text()
    vm.ctl.cmd("stop")
    vm.ctl.cmd("cont")
    text = r.wait_line("event RESUME")
    stamp = re.search(r"^\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] event STOP$", text, re.M)
    assert stamp, text
    now = time.localtime()
    assert abs((int(stamp[1]) * 3600 + int(stamp[2]) * 60 + int(stamp[3]))
               - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)) % 86400 < 30


def test_a_busy_monitor_is_named_as_such(vm, repl):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    holder = QEMUMonitorProtocol(vm.addr)
    holder.connect()  # another client holds the shell's monitor
    try:
        from qemu_ext.qmp.errors import QmpConnectError

        with pytest.raises(QmpConnectError) as ei:
            run_lines(vm.addr, "query-status", timeout=1.0)
        assert str(ei.value) == (f"cannot connect to QMP at {vm.addr}: QEMU sent no QMP greeting within 1 s: another "
                                 "client holds this monitor (QEMU serves one client per -qmp socket: give QEMU a "
                                 "second -qmp for virtopt)")
        r = Repl(vm.addr, timeout=2.5)
        try:
            r.wait_line(f"no greeting from {vm.addr} after 1 s: another client may hold this monitor")
            r.join(10)
            assert "another client holds this monitor" in str(r.exc)
        finally:
            r.exc = None
            r.close()
    finally:
        holder.close()


# -- in a real terminal ------------------------------------------------------------------------------


@pytest.fixture
def term(vm, tmp_path: Path):
    opened: list[Tmux] = []

    def start(*args: str, width: int = 100, height: int = 30, env=None) -> Tmux:
        t = Tmux(launcher_argv(vm.addr, "--history", str(tmp_path / "h"), *args), width, height, env=env)
        opened.append(t)
        t.wait_text("(QEMU replvm)")
        return t

    yield start
    for t in opened:
        t.close()


def test_terminal_menu_escape_and_paste(vm, term):
    t = term()
    t.type("system_")
    t.keys("Tab")
    t.wait_text("system_powerdown")
    t.keys("Tab")
    t.keys("Escape")
    t.wait(lambda s: "system_powerdown" not in s, "the menu closed")
    t.keys("C-u")
    t.paste("query-name\nno-such-command\nstop\n")
    t.wait_text("stopped at the error: 1 pasted line(s) not run")
    assert '{"return": {"name": "replvm"}}' in t.screen() and vm.ctl.cmd("query-status")["running"] is True
    t.type("system_powerdown")
    t.keys("Enter")
    t.wait_text("system_powerdown: the guest is asked to power off (ACPI power button). Send it? [y/N]")
    t.keys("Enter")
    t.wait_text("system_powerdown not sent")


def test_terminal_keys_typed_while_the_shell_starts_are_kept(vm, tmp_path: Path):
    # the prompt shows before the line editor has loaded: what is typed meanwhile must not be lost
    t = Tmux(launcher_argv(vm.addr, "--history", ""))
    try:
        t.type("query-name")
        t.keys("Enter")
        t.wait_text('{"return": {"name": "replvm"}}')
        # the next prompt follows the answer: wait for it before counting
        t.wait(lambda s: s.rstrip().endswith("(QEMU replvm)"), "the prompt after the answer")
        assert t.screen().count("(QEMU replvm)") == 2  # the early prompt was redrawn in place, not doubled
    finally:
        t.close()
    # a paste at the very first prompt is still one paste: it stops at its error
    t = Tmux(launcher_argv(vm.addr, "--history", ""))
    try:
        t.wait_text("(QEMU replvm)")
        t.paste("query-name\nno-such-command\nstop\n")
        t.wait_text("stopped at the error: 1 pasted line(s) not run")
        assert vm.ctl.cmd("query-status")["running"] is True
        assert "no-such-command" not in t.screen().split("(QEMU replvm)")[0]  # not echoed before the editor
    finally:
        t.close()


def test_terminal_pager_for_long_output(vm, term):
    t = term(height=20, env={"PAGER": "less -FRX"})
    t.type("query-qmp-schema")
    t.keys("Enter")
    t.wait(lambda s: s.rstrip().endswith(":"), "less waiting at its ':' prompt")
    assert t.screen().startswith("") and '{"return": [' in t.history()
    t.type("q")
    t.wait(lambda s: s.rstrip().endswith("(QEMU replvm)"), "the prompt back after q")
    t.keys("C-d")  # QEMU serves one client per monitor: this shell leaves before the next comes
    t.wait_text("EXIT=0")
    t2 = term("--no-pager", height=20)
    t2.type("query-qmp-schema")
    t2.keys("Enter")
    t2.wait(lambda s: s.rstrip().endswith("(QEMU replvm)") and '"meta-type"' in s, "the whole output, no pager")


def test_terminal_ctrl_c_stops_a_capture_and_turns_its_events_off(vm, term):
    t = term()
    t.type("/trace capture qcow2_cache_get 60")
    t.keys("Enter")
    deadline = time.monotonic() + 20
    while vm.ctl.cmd("trace-event-get-state", name="qcow2_cache_get")[0]["state"] != "enabled":
        assert time.monotonic() < deadline, t.screen()
        time.sleep(0.05)
    t.keys("C-c")
    t.wait_text("interrupted")
    assert vm.ctl.cmd("trace-event-get-state", name="qcow2_cache_get")[0]["state"] == "disabled"
    t.type("query-name")
    t.keys("Enter")
    t.wait_text('{"return": {"name": "replvm"}}')  # the shell lives on
    assert vm.alive()


def test_terminal_stats_watch_refreshes_in_place(vm, term):
    if vm.accel != "kvm":
        pytest.skip("query-stats needs KVM and /dev/kvm does not open on this host")
    t = term(width=90, height=40)
    t.type("/stats vcpu --watch 0.3")
    t.keys("Enter")
    t.wait(lambda s: re.search(r"\d\d:\d\d:\d\d vcpu stats", s) is not None, "a table")
    first = re.search(r"(\d\d:\d\d:\d\d) vcpu stats", t.screen())[1]
    t.wait(lambda s: re.search(r"(\d\d:\d\d:\d\d) vcpu stats", s)[1] != first, "a refresh", timeout=10)
    time.sleep(0.7)
    full = t.history()
    assert full.count("vcpu stats over") == 1  # drawn over itself, not appended
    rows = [ln for ln in full.splitlines() if re.match(r"^\S+\s+[\d,.]+", ln)]
    assert rows and max(len(ln) for ln in full.splitlines()) <= 90
    t.keys("C-c")
    t.wait(lambda s: s.rstrip().endswith("(QEMU replvm)"), "the prompt after Ctrl-C")
    assert "interrupted" not in t.screen()  # Ctrl-C is how a watch ends


def test_terminal_no_reconnect_exits_1_with_one_line(qemu_factory, tmp_path: Path):
    qp = qemu_factory(name="shortlived")
    t = Tmux(launcher_argv(str(qp.qmp_path), "--history", "", "--no-reconnect"))
    try:
        t.wait_text("(QEMU shortlived)")
        qp.proc.kill()
        qp.proc.wait()
        screen = t.wait_text("EXIT=1")
        tail = screen[screen.index("(QEMU shortlived)"):].strip().splitlines()
        assert tail[1:] == [f"virtopt: QEMU at {qp.qmp_path} went away (--no-reconnect: exiting)", "EXIT=1"]
    finally:
        t.close()


def test_history_file_mode_when_created_by_the_cli(vm, tmp_path: Path):
    hist = tmp_path / "cli-history"
    os.umask(0o022)
    t = Tmux(launcher_argv(vm.addr, "--history", str(hist)))
    try:
        t.wait_text("(QEMU replvm)")
        t.type("query-name")
        t.keys("Enter")
        t.wait_text('{"return": {"name": "replvm"}}')
        assert stat.S_IMODE(hist.stat().st_mode) == 0o600 and "query-name" in hist.read_text()
    finally:
        t.close()
