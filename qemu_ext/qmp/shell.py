"""Shell layer: a prompt-toolkit QMP REPL (and a script runner for ``-c`` and piped lines) on QmpSession.

- greeting with QEMU's version and the VM's name in the prompt; the schema for completion and
  checking loads in the background (the prompt comes up first)
- input as qmp-shell (:mod:`qemu_ext.qmp.parse`), checked against QEMU's schema before it is sent
  (:meth:`qemu_ext.qmp.schema.SchemaIndex.check`); ``-H`` HMP mode, ``/hmp LINE`` from QMP mode
- built-ins start with ``/`` (:mod:`qemu_ext.qmp.builtins`, one registry for dispatch, help, completion)
- events above the prompt with readable times (``--events=stdout|stderr|off``); JSON as QEMU sent
  them in scripts and with ``--output=json``
- errors: one line with QMP's class and description; ``--output=json`` prints ``{"error": {...}}``
- no surprises: Tab never picks a menu entry by itself, Enter on a highlighted entry only inserts it,
  Escape closes the menu, pasted lines run one after another and stop at the first error, commands
  that end or reset the guest ask first (interactive, without ``--yes``), Ctrl-C/Ctrl-D in a
  transaction say what they dropped; a pager for output longer than the terminal
- when QEMU goes away the shell says so and reconnects when it comes back (``--no-reconnect``: exit 1)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, TextIO

from qemu_ext.errors import BadInputError, VirtoptError
from qemu_ext.qmp.client import QmpSession
from qemu_ext.qmp.errors import QmpCommandError, QmpError, QmpGoneError
from qemu_ext.qmp.parse import BuiltinCommand, LineParser, ParseError, QmpCommand
from qemu_ext.qmp.shell_cli import DEFAULT_HISTORY

if TYPE_CHECKING:  # loaded on first use: the prompt shows before them
    from qemu_ext.qmp.builtins.registry import Result
    from qemu_ext.qmp.completion import CompletionData
    from qemu_ext.qmp.schema import SchemaIndex

RECONNECT_POLL = 0.25
PARSE_HINT = "(format: command-name [arg-name1=arg1] ... [arg-nameN=argN])"

# Commands that end or reset the guest: asked for when a person types them (QMP and HMP names).
DANGEROUS = {
    "quit": "QEMU exits and the VM stops at once",
    "q": "QEMU exits and the VM stops at once",
    "system_reset": "the guest resets, like pressing its reset button",
    "system_powerdown": "the guest is asked to power off (ACPI power button)",
}


@dataclass
class ShellOptions:
    address: str
    hmp: bool = False
    pretty: bool = False
    verbose: bool = False
    logfile: Optional[str] = None
    history: Optional[str] = DEFAULT_HISTORY
    output: str = "human"  # human | json
    timeout: float = 5.0
    reconnect: bool = True
    commands: list[str] = field(default_factory=list)
    negotiate: bool = True  # False: -N (qemu-ga, or negotiate by hand)
    keep_going: bool = False
    events: str = "stdout"  # stdout | stderr | off
    yes: bool = False  # run quit/system_reset/system_powerdown without asking
    pager: bool = True


class _Declined(Exception):
    pass


class _HelpText(Exception):
    """``/NAME --help``: text to show instead of running."""


def _may_convert(value: Any) -> bool:
    """A number, boolean or size-with-suffix anywhere in the arguments: the schema decides how it is sent."""
    from qemu_ext.qmp.schema import parse_size

    if isinstance(value, dict):
        return any(_may_convert(v) for v in value.values())
    if isinstance(value, list):
        return any(_may_convert(v) for v in value)
    if isinstance(value, str):
        return parse_size(value) is not None
    return isinstance(value, (int, float, bool))


def _schema_complaint(exc: QmpCommandError) -> bool:
    """QEMU's answers to an unknown command or argument (7.2 and 10.0): nothing ran."""
    return exc.error_class == "CommandNotFound" or (
        exc.error_class == "GenericError" and ("is unexpected" in exc.desc or "Invalid parameter type" in exc.desc))


def _complete_builtin(data: Any, before: list[str], word: str) -> list[str]:
    from qemu_ext.qmp import builtins

    return builtins.complete(data, before, word)


class Shell:
    """One shell on one QEMU address. ``stdout``/``stderr`` default to sys.stdout/sys.stderr at print time.

    It is the built-ins' :class:`qemu_ext.qmp.builtins.registry.Context`."""

    def __init__(self, opts: ShellOptions, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> None:
        self.opts = opts
        self.session = QmpSession(opts.address, name="virtopt-shell", timeout=opts.timeout, negotiate=opts.negotiate)
        self.parser = LineParser()
        self._completion: Optional[CompletionData] = None
        self.blockdev_options: dict[str, dict[str, Any]] = {}
        self.as_json = opts.output == "json"
        self.interactive = False
        self.raw_args = ""
        self.vm_name: Optional[str] = None
        self.prompt_session: Any = None  # the prompt-toolkit PromptSession while the REPL runs
        self._stdout = stdout
        self._stderr = stderr
        self._log: Optional[TextIO] = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._schema_task: Optional[asyncio.Task[Any]] = None
        self._hmp_task: Optional[asyncio.Task[Any]] = None
        self._current: Optional[asyncio.Task[Any]] = None
        self._gone: Optional[QmpGoneError] = None
        self._paste: list[str] = []
        self._paste_rest = ""
        self._held: Optional[list[dict[str, Any]]] = None  # events held back while a pager runs
        self._pt_io: tuple[Any, Any] = (None, None)
        self._noticed = 0
        if opts.logfile:
            try:
                self._log = open(opts.logfile, "a", encoding="utf-8")
            except OSError as exc:
                raise BadInputError(f"cannot open {opts.logfile}: {exc.strerror}") from exc

    @property
    def completion(self) -> CompletionData:
        """Schema and live names (created on first use)."""
        if self._completion is None:
            from qemu_ext.qmp.completion import CompletionData

            self._completion = CompletionData(builtin_completer=_complete_builtin)
        return self._completion

    # -- output -----------------------------------------------------------------------------------

    def out(self, text: str) -> None:
        print(text, file=self._stdout or sys.stdout, flush=True)

    def err(self, text: str) -> None:
        print(text, file=self._stderr or sys.stderr, flush=True)

    def log(self, obj: Any) -> None:
        if self._log is not None:
            self._log.write(json.dumps(obj) + "\n")
            self._log.flush()

    def dumps(self, obj: Any) -> str:
        """qmp-shell's printing: compact JSON, or indented and key-sorted with -p."""
        return json.dumps(obj, indent=4 if self.opts.pretty else None, sort_keys=self.opts.pretty)

    def _tty(self) -> bool:
        stream = self._stdout or sys.stdout
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def width(self) -> int:
        """Columns to fit tables to: the terminal's, else $COLUMNS, else 0 (no limit)."""
        import shutil

        if self._tty():
            return shutil.get_terminal_size().columns
        cols = os.environ.get("COLUMNS", "")
        return int(cols) if cols.isdigit() else 0

    def show(self, text: str) -> None:
        """Print, through a pager ($PAGER, else less -FRX) when a person would see it scroll away."""
        if not (self.interactive and self.opts.pager and self._tty() and self._stdout is None):
            self.out(text)
            return
        import shlex
        import shutil
        import subprocess

        size = shutil.get_terminal_size()
        shown = sum(max(1, -(-len(ln) // max(size.columns, 1))) for ln in text.split("\n"))  # wrapped rows
        if shown + 1 < size.lines:
            self.out(text)
            return
        pager = os.environ.get("PAGER") or "less -FRX"
        self._held = []
        try:
            subprocess.run(shlex.split(pager), input=text + "\n", text=True, check=False)
        except OSError:
            self.out(text)
        finally:
            held, self._held = self._held, None
            for ev in held:
                self.print_event(ev)

    def emit(self, result: Result) -> None:
        if self.as_json:
            self.out(json.dumps(result.data, indent=4 if self.opts.pretty else None))
        elif result.text:
            self.show(result.text)

    def report_error(self, error_class: str, desc: str, text: str, reply: Optional[dict[str, Any]] = None) -> None:
        """One line on stderr; with --output=json also ``{"error": {...}}`` on stdout (only that, at a prompt)."""
        if self.as_json:
            self.out(self.dumps(reply or {"error": {"class": error_class, "desc": desc}}))
            if self.interactive:
                return
        self.err(text)

    # -- session ----------------------------------------------------------------------------------

    def greeting_text(self) -> str:
        caps = self.session.capabilities
        mode = "HMP" if self.opts.hmp else "QMP"
        name = f", VM {self.vm_name}" if self.vm_name else ""
        return (f"Connected to QEMU {self.session.version_text} at {self.session.where}{name}"
                f" ({mode}; capabilities: {', '.join(caps) if caps else 'none'}"
                f"{'; oob enabled' if self.session.oob else ''})")

    async def start(self, interactive: bool) -> None:
        """Connect, learn the VM's name, start printing events (and loading completion, interactive)."""
        self.interactive = interactive
        await self.session.connect(slow=self.err if interactive else None)
        await self._after_connect()
        self._tasks.append(asyncio.create_task(self._event_pump()))
        if interactive:
            self._schema_task = asyncio.create_task(self._load_completion())

    async def _after_connect(self) -> None:
        self.vm_name = None
        if self.opts.negotiate:
            with contextlib.suppress(QmpError):
                self.vm_name = (await self.session.execute("query-name")).get("name")

    async def _load_completion(self) -> None:
        """Schema, trace events and live names (a failure only leaves completion poorer)."""
        try:
            await self.completion.load(self.session, hmp=True)  # HMP names: -H mode and /hmp
        except QmpError:
            pass

    async def _load_schema(self) -> None:
        from qemu_ext.qmp.schema import SchemaIndex

        try:
            self.completion.schema = SchemaIndex.from_schema(await self.session.execute("query-qmp-schema"))
        except QmpCommandError:
            self.completion.schema = None

    async def schema(self) -> Optional[SchemaIndex]:
        """The schema, waiting for the background load (or loading only it, in scripts)."""
        if self._schema_task is None:
            self._schema_task = asyncio.create_task(self._load_schema())
        with contextlib.suppress(Exception):
            await asyncio.shield(self._schema_task)
        return self.completion.schema

    async def hmp_commands(self) -> list[str]:
        if not self.completion.hmp_commands:
            if self._hmp_task is None or self._hmp_task.done():
                self._hmp_task = asyncio.create_task(self.completion.load_hmp(self.session))
            with contextlib.suppress(Exception):
                await asyncio.shield(self._hmp_task)
        return self.completion.hmp_commands

    async def close(self) -> None:
        for t in [*self._tasks, self._schema_task, self._hmp_task]:
            if t is not None:
                t.cancel()
        for t in [*self._tasks, self._schema_task, self._hmp_task]:
            if t is not None:
                with contextlib.suppress(BaseException):
                    await t
        self._tasks.clear()
        await self.session.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def _event_pump(self) -> None:
        while True:
            ev = await self.session.next_event()
            if ev is not None:
                self.print_event(ev)

    def print_event(self, ev: dict[str, Any]) -> None:
        self.log(ev)
        if self._held is not None:
            self._held.append(ev)
            return
        if self.opts.events == "off":
            return
        text = self.event_text(ev) if self.interactive and not self.as_json else self.dumps(ev)
        (self.err if self.opts.events == "stderr" else self.out)(text)

    def event_text(self, ev: dict[str, Any]) -> str:
        """``[14:02:11.352] event STOP`` (local time from QEMU's timestamp), then the data as JSON."""
        ts = ev.get("timestamp") or {}
        sec, usec = int(ts.get("seconds", 0) or 0), int(ts.get("microseconds", 0) or 0)
        stamp = time.strftime("%H:%M:%S", time.localtime(sec)) + f".{usec // 1000:03d}" if sec else "--:--:--"
        data = ev.get("data")
        return f"[{stamp}] event {ev.get('event')}" + (f" {json.dumps(data)}" if data else "")

    async def _watch_connection(self) -> None:
        """Say when QEMU goes away; reconnect when it comes back on the same address (or end, --no-reconnect)."""
        while True:
            await self.session.wait_disconnected()
            await self.session.close()
            if not self.opts.reconnect:
                self._gone = QmpGoneError(f"QEMU at {self.session.where} went away (--no-reconnect: exiting)")
                self._end_prompt()
                return
            self.err(f"QEMU at {self.session.where} went away; waiting for it to come back (Ctrl-D quits)")
            while True:
                await asyncio.sleep(RECONNECT_POLL)
                try:
                    await self.session.connect()
                except QmpError:
                    continue
                break
            self.parser.reset()
            await self._after_connect()
            self.completion.schema = None
            self._schema_task = asyncio.create_task(self._load_completion())
            self.out("reconnected: " + self.greeting_text())

    def _end_prompt(self) -> None:
        ps = self.prompt_session
        if ps is not None and ps.app.is_running:
            ps.app.exit(exception=EOFError())
        if self._current is not None:
            self._current.cancel()

    # -- one line ---------------------------------------------------------------------------------

    def _say_notices(self) -> None:
        """The transport's new notices (a libvirt domain marked tainted by our command), once each."""
        new = self.session.transport.notices[self._noticed:]
        self._noticed += len(new)
        for n in new:
            self.err(f"note: {n}")

    async def execute_line(self, line: str) -> int:
        """Run one input line; print its result. Returns 0, or the exit code of the error it printed."""
        try:
            return await self._execute_one(line)
        finally:
            self._say_notices()

    async def _execute_one(self, line: str) -> int:
        try:
            await self._execute_line(line)
            return 0
        except QmpCommandError as exc:
            reply = {k: v for k, v in exc.reply.items() if k != "id"}
            self.log(reply)
            self.report_error(exc.error_class, exc.desc, f"error: {exc.error_class}: {exc.desc}", reply)
            return exc.exit_code
        except ParseError as exc:
            self.report_error("ParseError", str(exc), f"parse error: {exc} {PARSE_HINT}")
            return exc.exit_code
        except _HelpText as h:
            self.show(str(h))
            return 0
        except _Declined as d:
            self.err(str(d))
            return 0
        except VirtoptError as exc:
            self.report_error(getattr(exc, "error_class", type(exc).__name__), str(exc), f"error: {exc}")
            return exc.exit_code

    async def _execute_line(self, line: str) -> None:
        stripped = line.strip()
        if not self.parser.in_transaction:
            if not stripped or stripped.startswith("#"):
                return
            if not self.opts.hmp and not stripped.startswith("/"):
                if stripped in ("help", "?"):
                    await self.run_builtin("help", [])
                    return
                words = stripped.split()
                if len(words) == 2 and words[1] == "?":  # CMD ?
                    await self.run_builtin("help", [words[0]])
                    return
            if self.opts.hmp and not stripped.startswith("/"):
                text = await self.run_hmp(stripped)
                if text:
                    self.show(text.rstrip("\n"))
                return
        parsed = self.parser.parse(line)
        if parsed is None:
            return
        if isinstance(parsed, BuiltinCommand):
            rest = stripped[len(stripped.split(None, 1)[0]):]
            await self.run_builtin(parsed.name, parsed.args, raw=rest)
        else:
            await self._run_qmp(parsed)

    async def _confirm(self, name: str) -> None:
        """Ask before a command that ends or resets the guest (interactive, without --yes)."""
        if name not in DANGEROUS or not self.interactive or self.opts.yes:
            return
        from prompt_toolkit import PromptSession

        inp, outp = self._pt_io
        ask: PromptSession[str] = PromptSession(input=inp, output=outp)
        try:
            answer = await ask.prompt_async(f"{name}: {DANGEROUS[name]}. Send it? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise _Declined(f"{name} not sent")

    async def _run_qmp(self, cmd: QmpCommand) -> None:
        msg = dict(cmd.msg)
        name = cmd.name
        args = msg.get("arguments")
        checkable = isinstance(args, dict) or args is None
        # The schema is asked for (once) at a prompt, or when a value may need converting (123 where a
        # string is wanted, 1G where an integer is): a script of plain commands does not wait for it.
        if checkable and (self.interactive or self._schema_task is not None or _may_convert(args or {})):
            schema = await self.schema()
            if schema is not None:
                checked, notes = schema.check(name, args or {})
                if args is not None:
                    msg["arguments"] = checked
                for n in notes:
                    self.err(f"note: {n}")
        await self._confirm(name)
        if self.opts.verbose:
            self.out(self.dumps(msg))
        self.log(msg)
        try:
            ret = await self.session.execute_msg(msg)
        except QmpCommandError as exc:
            # QEMU refused the name or an argument (nothing ran): say it as the schema check would
            if checkable and self._schema_task is None and _schema_complaint(exc):
                schema = await self.schema()
                if schema is not None:
                    schema.check(name, args or {})  # raises the SchemaError with "did you mean"
            raise
        reply: dict[str, Any] = {"return": ret}
        if "id" in msg:
            reply["id"] = msg["id"]
        self.show(self.dumps(reply))
        self.log(reply)
        if name == "qmp_capabilities" and self.completion.schema is None:
            self._schema_task = None  # negotiated by hand (-N): the schema can be asked for now
        if name == "blockdev-add" and isinstance(msg.get("arguments"), dict):
            a = msg["arguments"]
            if a.get("node-name"):
                self.blockdev_options[str(a["node-name"])] = dict(a)
        if self.interactive and not name.startswith("query-"):
            self._tasks.append(asyncio.create_task(self._refresh_names()))

    async def _refresh_names(self) -> None:
        with contextlib.suppress(QmpError):
            await self.completion.refresh_names(self.session)

    async def run_hmp(self, line: str) -> str:
        await self._confirm(line.split()[0] if line.split() else "")
        if self.opts.verbose:
            self.out(self.dumps({"execute": "human-monitor-command", "arguments": {"command-line": line}}))
        text = await self.session.hmp(line)
        self.log({"hmp": line, "return": text})
        return text

    async def run_builtin(self, name: str, args: list[str], as_json: bool = False, raw: str = "") -> None:
        from qemu_ext.qmp import builtins  # loaded on first use: the prompt does not wait for it
        from qemu_ext.qmp.builtins.registry import HelpShown

        b = builtins.lookup(name)
        try:
            ns, flag = builtins.registry.parse(b, args)
        except HelpShown as h:
            raise _HelpText(str(h)) from None
        saved = self.as_json, self.raw_args
        self.as_json = self.as_json or as_json or flag
        self.raw_args = raw
        try:
            result = await b.handler(self, ns)
            if result is not None:
                self.log({"builtin": f"/{name} {' '.join(args)}".strip(), "return": result.data})
                self.emit(result)
        finally:
            self.as_json, self.raw_args = saved

    # -- modes ------------------------------------------------------------------------------------

    async def run_script(self, lines: Any) -> int:
        """``-c`` mode (and stdin that is not a terminal): run lines in order; stop at the first error and
        return its exit code (``--keep-going``: run them all, exit with the first error's code).
        ``lines``: a list, or a callable returning the next line ('' at the end)."""
        await self.start(interactive=False)
        source = _AsyncLines(lines if callable(lines) else iter([*lines, ""]).__next__)
        first = 0
        try:
            async for line in source:
                try:
                    rc = await self.execute_line(line)
                except EOFError:
                    return first
                if rc:
                    first = first or rc
                    if not self.opts.keep_going:
                        return rc
            if self.parser.in_transaction:
                self.err(f"error: transaction( was not closed with ): {len(self.parser.actions)} action(s) not sent")
                return first or 1
            await asyncio.sleep(0)  # let events that came with the last reply print
            return first
        finally:
            await self.close()

    def prompt_text(self) -> str:
        name = f" {self.vm_name}" if self.vm_name else ""
        if self.parser.in_transaction:
            return f"(QEMU{name}) TRANS> "
        return f"(HMP{name}) " if self.opts.hmp else f"(QEMU{name}) "

    def _history(self) -> Any:
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = self.opts.history
        if not path:
            return InMemoryHistory()
        try:
            # commands can hold secrets (passwords, keys): the file is the user's alone
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
        except OSError as exc:
            self.err(f"warning: history file {path} unusable ({exc.strerror}); not saving history")
            return InMemoryHistory()
        return FileHistory(path)

    def _key_bindings(self) -> Any:
        from prompt_toolkit import search
        from prompt_toolkit.filters import completion_is_selected, has_completions, is_searching
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.keys import Keys

        kb = KeyBindings()

        @kb.add("tab", filter=~is_searching)
        def _tab(event: Any) -> None:
            # readline's way: the first Tab inserts what all candidates share, the next one shows the
            # menu; Tab never picks an entry by itself (arrows do; then Tab moves on)
            b = event.current_buffer
            st = b.complete_state
            if st is None:
                b.start_completion(insert_common_part=True)
            elif st.complete_index is not None:
                b.complete_next()

        @kb.add("s-tab", filter=has_completions)
        def _stab(event: Any) -> None:
            event.current_buffer.complete_previous()

        @kb.add("enter", filter=completion_is_selected)
        def _enter_on_entry(event: Any) -> None:
            # Enter on a highlighted entry only takes it into the line: nothing runs unseen
            event.current_buffer.complete_state = None

        @kb.add("escape", filter=has_completions, eager=True)
        def _escape(event: Any) -> None:
            event.current_buffer.cancel_completion()

        @kb.add("enter", filter=is_searching)
        def _enter_in_search(event: Any) -> None:
            search.accept_search()
            event.app.current_buffer.validate_and_handle()

        @kb.add(Keys.BracketedPaste)
        def _paste(event: Any) -> None:
            self._on_paste(event)

        return kb

    def _on_paste(self, event: Any) -> None:
        """Several pasted lines run one after another, as typed (qmp-shell's behaviour); the part after
        the last newline stays in the line for editing."""
        data = event.data.replace("\r\n", "\n").replace("\r", "\n")
        b = event.current_buffer
        if "\n" not in data:
            b.insert_text(data)
            return
        doc = b.document
        lines = (doc.text_before_cursor + data + doc.text_after_cursor).split("\n")
        complete, self._paste_rest = [ln for ln in lines[:-1] if ln.strip()], lines[-1]
        if not complete:
            b.text = self._paste_rest
            self._paste_rest = ""
            return
        self._paste = complete[1:]
        b.text = complete[0]
        b.validate_and_handle()

    def _drop_transaction(self, key: str) -> None:
        if not self.parser.in_transaction:
            return
        acts = [a["type"] for a in self.parser.actions]
        what = f"{len(acts)} action(s) dropped ({', '.join(acts)})" if acts else "no action was pending"
        self.err(f"{key}: transaction cancelled, nothing sent; {what}")
        self.parser.reset()

    async def repl(self, input: Any = None, output: Any = None) -> int:
        """Interactive loop until Ctrl-D or /quit. ``input``/``output``: prompt-toolkit objects (tests)."""
        self._pt_io = (input, output)
        await self.start(interactive=True)
        self.out(self.greeting_text())
        self.out("Type help (or CMD ?) for help, Tab to complete, Ctrl-D to quit.")
        # The prompt shows as soon as QEMU answered; the line editor (prompt-toolkit) loads meanwhile and
        # redraws it in place. Keys typed (and pastes, bracketed as the editor will ask for) in between wait
        # in the terminal, unechoed, and reach the editor as typeahead.
        early = _EarlyPrompt() if input is None and self._stdout is None and self._tty() and sys.stdin.isatty() \
            else None
        try:
            if early is not None:
                early.show(self.prompt_text())
            from prompt_toolkit import PromptSession
            from prompt_toolkit.patch_stdout import patch_stdout

            self._tasks.append(asyncio.create_task(self._watch_connection()))
            ps: PromptSession[str] = PromptSession(
                history=self._history(),
                completer=self._completer(),
                complete_while_typing=False,
                enable_history_search=True,
                key_bindings=self._key_bindings(),
                input=input,
                output=output,
            )
            self.prompt_session = ps
        finally:
            if early is not None:
                early.hand_over()
        try:
            while True:
                default, self._paste_rest = self._paste_rest, ""  # the unfinished line of a paste
                try:
                    # events print above the prompt while it waits; commands print straight to the
                    # terminal (one stream order for their output, progress bars and events)
                    with patch_stdout(raw=True) if self._stdout is None else contextlib.nullcontext():
                        line = await ps.prompt_async(self.prompt_text, default=default)
                except KeyboardInterrupt:
                    self._paste.clear()
                    self._drop_transaction("Ctrl-C")
                    continue
                except EOFError:
                    if self._gone is not None:
                        raise self._gone from None
                    if self.parser.in_transaction:
                        self._drop_transaction("Ctrl-D")
                        continue
                    break
                lines, self._paste = [line, *self._paste], []
                for i, ln in enumerate(lines):
                    if i:
                        ps.history.append_string(ln)
                        self.out(f"{self.prompt_text()}{ln}")
                    try:
                        rc = await self._interruptible(self.execute_line(ln))
                    except EOFError:
                        return 0
                    except Exception as exc:  # a bug must not end the session: one line, keep going
                        self.err(f"internal error: {type(exc).__name__}: {exc}")
                        rc = 1
                    if self._gone is not None:
                        raise self._gone
                    if rc and i + 1 < len(lines):
                        self.err(f"stopped at the error: {len(lines) - i - 1} pasted line(s) not run")
                        break
        finally:
            await self.close()
        return 0

    def _completer(self) -> Any:
        from qemu_ext.qmp.completion import ShellCompleter

        return ShellCompleter(self.completion, lambda: (self.opts.hmp, self.parser.in_transaction), self._loaded)

    async def _loaded(self) -> None:
        """Completion data ready (or given up on: a failed load leaves completion poorer, never stuck)."""
        task = self._schema_task
        if task is not None and not task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), self.opts.timeout)

    async def _interruptible(self, coro: Any) -> Any:
        """Run a command so that Ctrl-C cancels it (and not the shell)."""
        task = asyncio.ensure_future(coro)
        self._current = task
        loop = asyncio.get_running_loop()
        installed = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, task.cancel)
            installed = True
        try:
            return await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
            if self._gone is None:
                self.err("interrupted")
            return 130
        finally:
            self._current = None
            if installed:
                loop.remove_signal_handler(signal.SIGINT)


class _EarlyPrompt:
    """The prompt drawn before the line editor is loaded. Meanwhile the terminal neither echoes nor
    line-buffers what is typed (it waits for the editor as typeahead) and wraps pastes in bracketed-paste
    markers, as the editor will ask; ``hand_over()`` restores the terminal and erases the line."""

    def __init__(self) -> None:
        import termios

        self.fd = sys.stdin.fileno()
        self.saved: Optional[list[Any]] = None
        try:
            self.saved = termios.tcgetattr(self.fd)
            quiet = termios.tcgetattr(self.fd)
            quiet[3] &= ~(termios.ECHO | termios.ICANON)
            termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
        except termios.error:
            self.saved = None

    def show(self, prompt: str) -> None:
        sys.stdout.write("\x1b[?2004h" + prompt)
        sys.stdout.flush()

    def hand_over(self) -> None:
        import termios

        if self.saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
        sys.stdout.write("\x1b[?2004l\r\x1b[K")  # the editor turns bracketed paste on again as it draws
        sys.stdout.flush()


class _AsyncLines:
    """Lines from a blocking reader (stdin) without blocking the event loop (events keep printing).

    The reader runs in a daemon thread, so an early exit (first error) never waits for more input."""

    def __init__(self, readline: Callable[[], str]) -> None:
        self.readline = readline
        self.queue: Optional[asyncio.Queue[str]] = None

    def __aiter__(self) -> _AsyncLines:
        return self

    def _pump(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str]) -> None:
        while True:
            try:
                line = self.readline()
            except (OSError, ValueError):
                line = ""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            except RuntimeError:  # the loop is gone: the shell exited
                return
            if not line:
                return

    async def __anext__(self) -> str:
        if self.queue is None:
            import threading

            self.queue = asyncio.Queue()
            threading.Thread(target=self._pump, args=(asyncio.get_running_loop(), self.queue), daemon=True).start()
        line = await self.queue.get()
        if not line:
            raise StopAsyncIteration
        return line.rstrip("\n")


def run(opts: ShellOptions, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> int:
    """Entry point: ``-c`` lines when given, else the REPL. Connection failures raise QmpError."""
    shell = Shell(opts, stdout, stderr)
    if opts.commands:
        return asyncio.run(shell.run_script(opts.commands))
    if not sys.stdin.isatty():  # lines piped in: run them like -c, no prompt
        return asyncio.run(shell.run_script(sys.stdin.readline))
    return asyncio.run(shell.repl())


__all__ = ["DANGEROUS", "Shell", "ShellOptions", "run"]
