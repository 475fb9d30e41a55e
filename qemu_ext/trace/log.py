"""The log trace backend's text (stderr, or a ``-D`` file), with or without the ``pid@sec.usec:`` prefix.

QEMU prints ``qemu_log("NAME " FMT "\\n", args)``, or with ``-msg timestamp=on``
``qemu_log("%d@%zu.%06zu:NAME " FMT "\\n", tid, sec, usec, args)``
(scripts/tracetool/backend/log.py). Arguments are recovered by turning the event's
format string from trace-events into a regular expression.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, Optional

from qemu_ext.errors import BadInputError, NotAvailableError
from qemu_ext.trace.events import EventsFile, TraceEvent, get_events
from qemu_ext.trace.records import ArgValue, TraceRecord

_PROMPTS = ("qemu-io> ", "(qemu) ")
_PREFIX_RE = re.compile(r"^(\d+)@(\d+)\.(\d+):(\w+)(?: (.*))?$")
_PLAIN_RE = re.compile(r"^([A-Za-z_]\w*)(?: (.*))?$")
_CONV_RE = re.compile(r"%([-+ #0]*)(\d+|\*)?(?:\.(\d+|\*))?(hh|h|ll|l|z|j|t|L|q)?([diouxXcspfFeEgGaA%])")

_NUM = r"[-+]?\d+"


def _conv_int(base: int) -> Callable[[str], ArgValue]:
    def conv(s: str) -> ArgValue:
        try:
            return int(s, base)
        except ValueError:
            return s

    return conv


def _conv_ptr(s: str) -> ArgValue:
    if s == "(nil)":
        return 0
    try:
        return int(s, 16)
    except ValueError:
        return s


def _conv_str(s: str) -> ArgValue:
    return s


_CONV: dict[str, tuple[str, Callable[[str], ArgValue]]] = {
    "d": (_NUM, _conv_int(10)),
    "i": (_NUM, _conv_int(10)),
    "u": (r"\d+", _conv_int(10)),
    "x": (r"[0-9a-fA-F]+", _conv_int(16)),
    "X": (r"[0-9a-fA-F]+", _conv_int(16)),
    "o": (r"[0-7]+", _conv_int(8)),
    "p": (r"0x[0-9a-fA-F]+|\(nil\)", _conv_ptr),
    "c": (r".", _conv_str),
    "s": (r".*?", _conv_str),
}
_FLOAT = (r"[-+]?(?:[0-9.]+(?:[eE][-+]?\d+)?|inf|nan|0x[0-9a-fA-Fp.+-]+)", _conv_str)


class _Matcher:
    __slots__ = ("convs", "names", "regex")

    def __init__(self, regex: Optional[re.Pattern], names: list[str], convs: list[Callable[[str], ArgValue]]):
        self.regex = regex
        self.names = names
        self.convs = convs


def _compile(ev: TraceEvent) -> _Matcher:
    """A regex for the text QEMU prints for this event's format, or a matcher without one."""
    parts: list[str] = []
    convs: list[Callable[[str], ArgValue]] = []
    names: list[str] = []
    args = ev.arg_names
    pos = 0
    ai = 0
    ok = True
    for m in _CONV_RE.finditer(ev.fmt):
        parts.append(re.escape(ev.fmt[pos : m.start()]))
        pos = m.end()
        conv = m.group(5)
        if conv == "%":
            parts.append("%")
            continue
        if m.group(2) == "*" or m.group(3) == "*":
            ok = False  # a width taken from an argument: positions no longer line up
            break
        pat, fn = _CONV.get(conv, _FLOAT)
        if conv in "xX" and "#" in m.group(1):
            pat = r"(?:0[xX])?" + pat
        parts.append(f"({pat})")
        convs.append(fn)
        if ai < len(args):
            names.append(args[ai])
        ai += 1
    parts.append(re.escape(ev.fmt[pos:]))
    if not ok or ai != len(args):
        return _Matcher(None, [], [])
    text = "".join(parts)
    try:
        rx = re.compile(text + r"\s*$", re.S)
    except re.error:
        return _Matcher(None, [], [])
    return _Matcher(rx, names, convs)


_WORD_VALUE_RE = re.compile(r"([A-Za-z_]\w*)(?:=|:?\s+)(0x[0-9a-fA-F]+|[-+]?\d+|\(nil\))(?=[\s,;)]|$)")


def _heuristic_args(text: str) -> dict[str, ArgValue]:
    """``key value`` / ``key=value`` pairs, for events whose format could not be used."""
    out: dict[str, ArgValue] = {}
    for k, v in _WORD_VALUE_RE.findall(text):
        if v == "(nil)":
            out[k] = 0
        elif v.lower().startswith("0x"):
            out[k] = int(v, 16)
        else:
            out[k] = int(v)
    return out


class LogParser:
    """Stateful parser: compiles each event's format once."""

    def __init__(self, events: Optional[EventsFile] = None) -> None:
        self.events = events
        self._cache: dict[str, Optional[_Matcher]] = {}
        self.lines = 0
        self.skipped = 0

    def _matcher(self, name: str) -> Optional[_Matcher]:
        if name in self._cache:
            return self._cache[name]
        m: Optional[_Matcher] = None
        if self.events is not None:
            ev = self.events.get(name)
            if ev is not None:
                m = _compile(ev)
        self._cache[name] = m
        return m

    def parse_line(self, line: str) -> Optional[TraceRecord]:
        line = line.rstrip("\r\n")
        while line.startswith(_PROMPTS):  # qemu-io's prompt shares the terminal with stderr
            line = line.split(" ", 1)[1] if " " in line else ""
        pid: Optional[int] = None
        ts: Optional[int] = None
        m = _PREFIX_RE.match(line)
        if m is not None:
            pid = int(m.group(1))
            usec = m.group(3)
            ts = int(m.group(2)) * 1_000_000_000 + int(usec.ljust(6, "0")[:6]) * 1000
            name, rest = m.group(4), m.group(5) or ""
        else:
            m = _PLAIN_RE.match(line)
            if m is None:
                return None
            name, rest = m.group(1), m.group(2) or ""
        matcher = self._matcher(name)
        if matcher is None:
            # not an event of trace-events: only accept it when there is no events file at all
            if self.events is not None or "_" not in name:
                return None
            return TraceRecord(name, _heuristic_args(rest), ts, pid)
        if matcher.regex is None:
            return TraceRecord(name, _heuristic_args(rest), ts, pid)
        mm = matcher.regex.match(rest)
        if mm is None:
            return TraceRecord(name, _heuristic_args(rest), ts, pid)
        args = {n: c(v) for n, c, v in zip(matcher.names, matcher.convs, mm.groups())}
        return TraceRecord(name, args, ts, pid)


def optional_events(events_file=None) -> Optional[EventsFile]:
    """The events file asked for (its errors are the user's), else the installed QEMU's, else None:
    log text can still be parsed without one."""
    try:
        return get_events(events_file)
    except NotAvailableError:
        if events_file is not None:
            raise
        return None


def parse_log_lines(lines: Iterable[str], events_file=None) -> Iterator[TraceRecord]:
    """Parse log-backend lines (with or without ``pid@sec.usec:``); other lines are skipped.

    events_file: a path or EventsFile; default the trace-events-all of the installed QEMU.
    Without any events file, lines that look like ``name_with_underscore key value ...`` are
    accepted and their ``key value`` pairs taken as arguments.
    """
    p = LogParser(optional_events(events_file))
    for line in lines:
        p.lines += 1
        rec = p.parse_line(line)
        if rec is None:
            p.skipped += 1
            continue
        yield rec


def arg_labels(event: str, events_file=None) -> dict[str, str]:
    """Declared argument name -> the word printed before it in the event's format string.

    TraceRecord.args use the declared names (as simpletrace.py does); the log text shows the
    format's words, e.g. qcow2_cache_get's ``c`` is printed as ``is_l2_cache``.
    """
    ev = get_events(events_file).get(event)
    if ev is None:
        raise BadInputError(f"event '{event}' is not in the trace-events file")
    out: dict[str, str] = {}
    pos = 0
    ai = 0
    names = ev.arg_names
    for m in _CONV_RE.finditer(ev.fmt):
        lit = ev.fmt[pos : m.start()]
        pos = m.end()
        if m.group(5) == "%":
            continue
        if ai >= len(names):
            break
        words = re.findall(r"(?<!\w)[A-Za-z_]\w*", lit)
        out[names[ai]] = words[-1] if words else names[ai]
        ai += 1
    for n in names[ai:]:
        out[n] = n
    return out
