"""Shell layer: a prompt-toolkit QMP REPL (and a script runner for ``-c``) on QmpSession.

- greeting with QEMU's version; oob negotiated when offered
- input as qmp-shell (see :mod:`qemu_ext.qmp.parse`), ``-H`` HMP mode, ``-p`` pretty, ``-v`` verbose,
  ``-l LOGFILE``, a history file, completion from the schema
- events printed above the prompt as they arrive
- errors with their class and description; when QEMU goes away the shell says so and reconnects
  when it comes back on the same address
- built-ins start with ``/`` (see :mod:`qemu_ext.qmp.builtins`); ``/help`` lists them
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TextIO

from qemu_ext.errors import BadInputError, VirtoptError
from qemu_ext.qmp import builtins, render
from qemu_ext.qmp.client import QmpSession
from qemu_ext.qmp.completion import CompletionData, ShellCompleter
from qemu_ext.qmp.errors import QmpCommandError, QmpError, QmpGoneError
from qemu_ext.qmp.parse import BuiltinCommand, LineParser, ParseError, QmpCommand
from qemu_ext.qmp.shell_cli import DEFAULT_HISTORY

RECONNECT_POLL = 0.25

HELP = """\
QMP input (as qmp-shell):   cmd key=value key.sub=value   (values: ints, true/false, JSON, Python literals)
                            transaction( ... )   one action per line, ')' runs it
                            {"execute": "...", "arguments": {...}}   a raw JSON line
built-ins:
  /trace list [PATTERN]              trace events and their state
  /trace on|off PATTERN              enable / disable trace events
  /trace capture PATTERN SECONDS [FILE] [--node NODE]
                                     enable, wait, disable, flush, decode (simple or log backend);
                                     qcow2_cache events: replay the L2 lookups in the L2-cache simulator
  /trace-file [on|off|flush|set FILE]
                                     the simple backend's trace file (HMP trace-file)
  /stats [vm|vcpu] [--interval S] [--watch S] [--count K] [--all]
                                     KVM statistics per second (query-stats), like kvm_stat;
                                     --watch repeats every S seconds (Ctrl-C stops)
  /threads                           QEMU's threads, their roles, last CPU and affinity
  /mtree lookup ADDR [io|memory]     the region and device owning an I/O port or address
  /l2cache [NODE]                    qcow2 cache settings and the full-coverage l2-cache-size
  /json ...                          any built-in, printed as JSON
  /help, /quit
"""


@dataclass
class ShellOptions:
    address: str
    hmp: bool = False
    pretty: bool = False
    verbose: bool = False
    logfile: Optional[str] = None
    history: Optional[str] = DEFAULT_HISTORY
    output: str = "human"  # how built-ins print: human | json
    timeout: float = 5.0
    reconnect: bool = True
    commands: list[str] = field(default_factory=list)


class Shell:
    """One shell on one QEMU address. ``stdout``/``stderr`` default to sys.stdout/sys.stderr at print time."""

    def __init__(self, opts: ShellOptions, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> None:
        self.opts = opts
        self.session = QmpSession(opts.address, name="virtopt-shell", timeout=opts.timeout)
        self.parser = LineParser()
        self.completion = CompletionData()
        self.blockdev_options: dict[str, dict[str, Any]] = {}
        self._stdout = stdout
        self._stderr = stderr
        self._log: Optional[TextIO] = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.prompt_session: Any = None  # the prompt-toolkit PromptSession while the REPL runs
        if opts.logfile:
            try:
                self._log = open(opts.logfile, "a", encoding="utf-8")
            except OSError as exc:
                raise BadInputError(f"cannot open log file {opts.logfile}: {exc.strerror}") from exc

    # -- output -----------------------------------------------------------------------------------

    def out(self, text: str) -> None:
        print(text, file=self._stdout or sys.stdout, flush=True)

    def err(self, text: str) -> None:
        print(text, file=self._stderr or sys.stderr, flush=True)

    def log(self, obj: Any) -> None:
        if self._log is not None:
            self._log.write(json.dumps(obj) + "\n")
            self._log.flush()

    # -- session ----------------------------------------------------------------------------------

    def greeting_text(self) -> str:
        caps = self.session.capabilities
        mode = "HMP" if self.opts.hmp else "QMP"
        return (f"Connected to QEMU {self.session.version_text} at {self.session.where}"
                f" ({mode}; capabilities: {', '.join(caps) if caps else 'none'}"
                f"{'; oob enabled' if self.session.oob else ''})")

    async def start(self, completion: bool = True) -> None:
        """Connect, load completion data (for the REPL), start printing events."""
        await self.session.connect()
        if completion:
            await self._load_completion()
        self._tasks.append(asyncio.create_task(self._event_pump()))

    async def _load_completion(self) -> None:
        try:
            await self.completion.load(self.session)
            if self.opts.hmp:
                self.completion.hmp_commands = _hmp_words(await self.session.hmp("help"))
                self.completion.hmp_info = [w.split(" ", 1)[-1] for w in
                                            _hmp_words(await self.session.hmp("help info"), 2)]
        except QmpError:
            pass  # completion is a comfort: a failure here must not stop the shell

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
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
            if ev is None:
                continue
            self.print_event(ev)

    def print_event(self, ev: dict[str, Any]) -> None:
        self.out(render.dumps(ev, self.opts.pretty))
        self.log(ev)

    async def _watch_connection(self) -> None:
        """Say when QEMU goes away; reconnect when it comes back on the same address."""
        while True:
            await self.session.wait_disconnected()
            await self.session.close()
            self.err(f"QEMU at {self.session.where} went away; waiting for it to come back (Ctrl-D quits)")
            while True:
                await asyncio.sleep(RECONNECT_POLL)
                try:
                    await self.session.connect()
                except QmpError:
                    continue
                break
            self.parser.reset()
            await self._load_completion()
            self.out("reconnected: " + self.greeting_text())

    # -- one line ---------------------------------------------------------------------------------

    async def execute_line(self, line: str) -> int:
        """Run one input line; print its result. Returns 0, or the exit code of the error it printed."""
        try:
            stripped = line.strip()
            if self.opts.hmp and not stripped.startswith("/"):
                if stripped:
                    await self._run_hmp(stripped)
                return 0
            parsed = self.parser.parse(line)
            if parsed is None:
                return 0
            if isinstance(parsed, BuiltinCommand):
                await self.run_builtin(parsed)
            else:
                await self._run_qmp(parsed)
            return 0
        except QmpCommandError as exc:
            self.err(f"error: {exc.error_class}: {exc.desc}")
            self.log(exc.reply)
            return exc.exit_code
        except ParseError as exc:
            self.err(f"parse error: {exc} (format: command-name [arg-name1=arg1] ... [arg-nameN=argN])")
            return exc.exit_code
        except VirtoptError as exc:
            self.err(f"error: {exc}")
            return exc.exit_code

    async def _run_qmp(self, cmd: QmpCommand) -> None:
        msg = cmd.msg
        if self.opts.verbose:
            self.out(render.dumps(msg, self.opts.pretty))
        self.log(msg)
        ret = await self.session.execute_msg(msg)
        reply: dict[str, Any] = {"return": ret}
        if "id" in msg:
            reply["id"] = msg["id"]
        self.out(render.dumps(reply, self.opts.pretty))
        self.log(reply)
        name = cmd.name
        if name == "blockdev-add" and isinstance(msg.get("arguments"), dict):
            args = msg["arguments"]
            if args.get("node-name"):
                self.blockdev_options[str(args["node-name"])] = dict(args)
        if name in ("blockdev-add", "blockdev-del", "device_add", "device_del", "blockdev-open-tray",
                    "blockdev-insert-medium", "blockdev-remove-medium", "drive_add"):
            with contextlib.suppress(QmpError):
                await self.completion.refresh_names(self.session)

    async def _run_hmp(self, line: str) -> None:
        if self.opts.verbose:
            self.out(render.dumps({"execute": "human-monitor-command",
                                   "arguments": {"command-line": line}}, self.opts.pretty))
        text = await self.session.hmp(line)
        self.log({"hmp": line, "return": text})
        if text:
            self.out(text.rstrip("\n"))

    # -- built-ins --------------------------------------------------------------------------------

    async def run_builtin(self, cmd: BuiltinCommand) -> None:
        name, args = cmd.name, list(cmd.args)
        as_json = self.opts.output == "json"
        if name == "json":
            if not args:
                raise BadInputError("/json needs a built-in: /json stats vm")
            name, args, as_json = args[0].lstrip("/"), args[1:], True
        if "--json" in args:
            args.remove("--json")
            as_json = True
        handler = self._builtins().get(name)
        if handler is None:
            raise BadInputError(f"unknown built-in /{name} (try /help)")
        data, text = await handler(args)
        if data is None:
            return
        self.log({"builtin": cmd.line, "return": _jsonable(data)})
        if as_json:
            self.out(json.dumps(_jsonable(data), indent=4 if self.opts.pretty else None))
        elif text:
            self.out(text)

    def _builtins(self) -> dict[str, Callable[[list[str]], Any]]:
        return {
            "help": self._b_help,
            "quit": self._b_quit,
            "exit": self._b_quit,
            "trace": self._b_trace,
            "trace-file": self._b_trace_file,
            "stats": self._b_stats,
            "threads": self._b_threads,
            "mtree": self._b_mtree,
            "l2cache": self._b_l2cache,
        }

    async def _b_help(self, args: list[str]) -> tuple[Any, str]:
        self.out(HELP.rstrip("\n"))
        return None, ""

    async def _b_quit(self, args: list[str]) -> tuple[Any, str]:
        raise EOFError

    async def _b_trace(self, args: list[str]) -> tuple[Any, str]:
        if not args:
            raise BadInputError("usage: /trace list [PATTERN] | on PATTERN | off PATTERN | capture PATTERN SECONDS [FILE]")
        op, rest = args[0], args[1:]
        if op == "list":
            if len(rest) > 1:
                raise BadInputError("usage: /trace list [PATTERN]")
            evs = await builtins.trace_list(self.session, rest[0] if rest else "*")
            return [e.to_dict() for e in evs], render.trace_states(evs)
        if op in ("on", "off"):
            if len(rest) != 1:
                raise BadInputError(f"usage: /trace {op} PATTERN")
            evs = await builtins.trace_set(self.session, rest[0], op == "on")
            return [e.to_dict() for e in evs], render.trace_states(evs)
        if op == "capture":
            node = None
            if "--node" in rest:
                i = rest.index("--node")
                if i + 1 >= len(rest):
                    raise BadInputError("--node needs a node name")
                node = rest[i + 1]
                del rest[i:i + 2]
            if len(rest) not in (2, 3):
                raise BadInputError("usage: /trace capture PATTERN SECONDS [FILE] [--node NODE]")
            try:
                secs = float(rest[1])
            except ValueError:
                raise BadInputError(f"not a number of seconds: {rest[1]!r}") from None
            res = await builtins.trace_capture(self.session, rest[0], secs, rest[2] if len(rest) == 3 else None,
                                               node=node, known_options=self.blockdev_options)
            return res.to_dict(), render.capture(res)
        raise BadInputError(f"unknown /trace operation {op!r} (list, on, off, capture)")

    async def _b_trace_file(self, args: list[str]) -> tuple[Any, str]:
        op = args[0] if args else ""
        if op == "set" and len(args) != 2:
            raise BadInputError("usage: /trace-file set FILE")
        if op != "set" and len(args) > 1:
            raise BadInputError("usage: /trace-file [on|off|flush|set FILE]")
        st = await builtins.trace_file(self.session, op, args[1] if op == "set" else None)
        return st.to_dict(), render.trace_file_status(st)

    async def _b_stats(self, args: list[str]) -> tuple[Any, str]:
        target, watch, count, all_rows, interval = "vm", None, None, False, 1.0
        it = iter(args)
        for a in it:
            if a in ("vm", "vcpu"):
                target = a
            elif a in ("--watch", "--count", "--interval"):
                v = next(it, None)
                try:
                    num = float(v) if v is not None else None
                except ValueError:
                    num = None
                if num is None or num <= 0:
                    raise BadInputError(f"{a} needs a positive number")
                if a == "--count":
                    count = int(num)
                elif a == "--watch":
                    watch = interval = num
                else:
                    interval = num
            elif a == "--all":
                all_rows = True
            else:
                raise BadInputError("usage: /stats [vm|vcpu] [--interval S] [--watch S] [--count K] [--all]")
        if watch is None and count is None:
            rep = await builtins.stats(self.session, target, interval)
            return rep.to_dict(), render.stats(rep, all_rows)
        n = 0
        reports = []
        while count is None or n < count:
            rep = await builtins.stats(self.session, target, interval)
            n += 1
            if self.opts.output == "json":
                self.out(json.dumps(rep.to_dict(), indent=4 if self.opts.pretty else None))
                reports.append(rep.to_dict())
            else:
                self.out(time.strftime("%H:%M:%S ") + render.stats(rep, all_rows))
        return None, ""

    async def _b_threads(self, args: list[str]) -> tuple[Any, str]:
        if args:
            raise BadInputError("usage: /threads")
        items = await builtins.threads(self.session)
        return items, render.threads(items)

    async def _b_mtree(self, args: list[str]) -> tuple[Any, str]:
        if not args or args[0] != "lookup" or len(args) not in (2, 3):
            raise BadInputError("usage: /mtree lookup ADDR [io|memory]")
        m = await builtins.mtree_lookup(self.session, args[1], args[2] if len(args) == 3 else "io")
        return m.to_dict(), render.mtree(m)

    async def _b_l2cache(self, args: list[str]) -> tuple[Any, str]:
        if len(args) > 1:
            raise BadInputError("usage: /l2cache [NODE]")
        items = await builtins.l2cache(self.session, args[0] if args else None, self.blockdev_options)
        return [i.to_dict() for i in items], render.l2cache(items)

    # -- modes ------------------------------------------------------------------------------------

    async def run_script(self, lines: Any) -> int:
        """``-c`` mode (and stdin that is not a terminal): run lines in order; stop at the first error and
        return its exit code. ``lines``: a list, or a callable returning the next line ('' at the end)."""
        await self.start(completion=False)
        if callable(lines):
            lines = _AsyncLines(lines)
        else:
            lines = _AsyncLines(iter([*lines, ""]).__next__)
        try:
            async for line in lines:
                try:
                    rc = await self.execute_line(line)
                except EOFError:
                    return 0
                if rc:
                    return rc
            if self.parser.in_transaction:
                self.err("error: transaction( was not closed with )")
                return 1
            await asyncio.sleep(0)  # let events that came with the last reply print
            return 0
        finally:
            await self.close()

    def prompt_text(self) -> str:
        if self.parser.in_transaction:
            return "(QEMU) TRANS> "
        return "(HMP) " if self.opts.hmp else "(QEMU) "

    async def repl(self, input: Any = None, output: Any = None) -> int:
        """Interactive loop until Ctrl-D or /quit. ``input``/``output``: prompt-toolkit objects (tests)."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory
        from prompt_toolkit.patch_stdout import patch_stdout

        await self.start()
        self.out(self.greeting_text())
        self.out("Type /help for the built-ins, Ctrl-D to quit.")
        if self.opts.reconnect:
            self._tasks.append(asyncio.create_task(self._watch_connection()))
        history: History = InMemoryHistory()
        if self.opts.history:
            try:
                with open(self.opts.history, "a", encoding="utf-8"):
                    pass
                history = FileHistory(self.opts.history)
            except OSError as exc:
                self.err(f"warning: history file {self.opts.history} unusable ({exc.strerror}); not saving history")
        ps: PromptSession[str] = PromptSession(
            history=history,
            completer=ShellCompleter(self.completion, self.opts.hmp),
            complete_while_typing=False,
            input=input,
            output=output,
        )
        self.prompt_session = ps
        try:
            with patch_stdout(raw=True) if self._stdout is None else contextlib.nullcontext():
                while True:
                    try:
                        line = await ps.prompt_async(self.prompt_text)
                    except KeyboardInterrupt:
                        self.parser.reset()
                        continue
                    except EOFError:
                        break
                    try:
                        await self._interruptible(self.execute_line(line))
                    except EOFError:
                        break
                    except Exception as exc:  # a bug must not end the session: one line, keep going
                        self.err(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            await self.close()
        return 0

    async def _interruptible(self, coro: Any) -> Any:
        """Run a command so that Ctrl-C cancels it (and not the shell)."""
        task = asyncio.ensure_future(coro)
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
            self.err("interrupted")
            return 130
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGINT)


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


def _hmp_words(help_text: str, n: int = 1) -> list[str]:
    """Command names from HMP ``help`` (first ``n`` words of each entry; continuation lines are indented)."""
    out = set()
    for ln in help_text.splitlines():
        if not ln.strip() or ln[0].isspace():
            continue
        words = ln.split(" -- ", 1)[0].split()
        if len(words) >= n:
            out.add(" ".join(w.split("|")[0] for w in words[:n]))
    return sorted(out)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, list):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def run(opts: ShellOptions, stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> int:
    """Entry point: ``-c`` lines when given, else the REPL. Connection failures raise QmpError."""
    shell = Shell(opts, stdout, stderr)
    if opts.commands:
        return asyncio.run(shell.run_script(opts.commands))
    if not sys.stdin.isatty():  # lines piped in: run them like -c, no prompt
        return asyncio.run(shell.run_script(sys.stdin.readline))
    return asyncio.run(shell.repl())


__all__ = ["HELP", "QmpGoneError", "Shell", "ShellOptions", "run"]
