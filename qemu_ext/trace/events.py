"""trace-events files: event names, argument types and names, format strings.

The syntax is QEMU's (scripts/tracetool/__init__.py, ``Event._CRE``)::

    [disable] [vcpu] name(type1 arg1, type2 arg2) "format %p %" PRIx64 " ..."

Events with the ``vcpu`` property get an implicit first argument ``void *__cpu``
and a ``"cpu=%p "`` format prefix, as tracetool does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from qemu_ext.errors import BadInputError, NotAvailableError

# tracetool's Event._CRE; compiled on first use (re caches it): decoding to text needs none of these
_EVENT_RE = (
    r"((?P<props>[\w\s]+)\s+)?"
    r"(?P<name>\w+)"
    r"\((?P<args>[^)]*)\)"
    r"\s*"
    r"(?:(?:(?P<fmt_trans>\".+),)?\s*(?P<fmt>\".+))?"
    r"\s*"
)
_VALID_PROPS = {"disable", "vcpu"}
_DECL_NAME_RE = r"\n[ \t]*(?:(?:disable|vcpu)[ \t]+)*(\w+)\("  # on "\n" + text: faster than (?m)^

# Where trace-events-all usually lives (Debian installs it with the QEMU package).
SYSTEM_EVENTS_FILES = (
    "/usr/share/qemu/trace-events-all",
    "/usr/local/share/qemu/trace-events-all",
)


def is_string_type(ctype: str) -> bool:
    """tracetool.backend.simple.is_string: ``const char *`` / ``char *`` (one star)."""
    s = ctype.lstrip()
    return s.startswith(("const char*", "char*", "const char *", "char *")) and s.count("*") == 1


class EventArg:
    """One declared argument: its C type and name. (Plain classes, not dataclasses: decoding a
    trace to text imports this module, and dataclasses costs milliseconds to import.)"""

    __slots__ = ("name", "type")

    def __init__(self, type: str, name: str) -> None:
        self.type = type
        self.name = name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EventArg) and (self.type, self.name) == (other.type, other.name)

    def __hash__(self) -> int:
        return hash((self.type, self.name))

    def __repr__(self) -> str:
        return f"EventArg(type={self.type!r}, name={self.name!r})"

    @property
    def is_string(self) -> bool:
        return is_string_type(self.type)


class TraceEvent:
    """One event of a trace-events file.

    fmt: the C format string, PRI macros expanded to their conversion (e.g. "%" PRIx64 -> %llx).
    """

    __slots__ = ("args", "filename", "fmt", "lineno", "name", "properties")

    def __init__(self, name: str, args: list[EventArg], fmt: str, properties: Optional[list[str]] = None,
                 lineno: int = 0, filename: str = "") -> None:
        self.name = name
        self.args = args
        self.fmt = fmt
        self.properties = list(properties or [])
        self.lineno = lineno
        self.filename = filename

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TraceEvent) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TraceEvent(name={self.name!r}, args={self.args!r}, fmt={self.fmt!r}, properties={self.properties!r})"

    @property
    def arg_names(self) -> list[str]:
        return [a.name for a in self.args]

    @property
    def has_strings(self) -> bool:
        return any(a.is_string for a in self.args)

    def simple_size(self) -> Optional[int]:
        """Bytes of arguments in a simpletrace record (None when it carries strings)."""
        if self.has_strings:
            return None
        return 8 * len(self.args)


# scripts/simpletrace.py's stand-in for dropped-events records (7.2 and 10.0)
DROPPED_EVENT = TraceEvent("Dropped_Event", [EventArg("uint64_t", "num_events_dropped")], "", [], 0, "simpletrace.py")


def _parse_args(text: str) -> list[EventArg]:
    res: list[EventArg] = []
    for raw in text.split(","):
        arg = raw.strip()
        if not arg:
            raise ValueError("empty argument (did you forget to use 'void'?)")
        if arg == "void":
            continue
        if "*" in arg:
            t, ident = arg.rsplit("*", 1)
            t += "*"
            ident = ident.strip()
        else:
            parts = arg.rsplit(None, 1)
            if len(parts) != 2:
                raise ValueError(f"argument {arg!r} has no name")
            t, ident = parts
        if not ident.isidentifier():
            raise ValueError(f"argument {arg!r} has no valid name")
        res.append(EventArg(t, ident))
    return res


_PRI_RE = r'"\s*PRI([diouxX])(8|16|32|64|PTR|MAX)\s*"'


def _c_string(fmt_literal: str) -> str:
    """Turn the C string-literal sequence of a format (with PRI macros) into one format string."""
    s = fmt_literal.strip()
    # "%" PRIx64 " ..." -> "%llx ..." (the macro sits between two literals)
    s = re.sub(_PRI_RE, lambda m: "ll" + m.group(1) if m.group(2) == "64" else m.group(1), s)
    s = re.sub(r'"\s*PRI([diouxX])(8|16|32|64|PTR|MAX)\s*$', lambda m: '"', s)  # trailing macro
    # now join adjacent literals: "a" "b" -> "ab"
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"', s)
    text = "".join(parts)
    return text.replace('\\"', '"').replace("\\\\", "\\").replace("\\n", "\n").replace("\\t", "\t")


def _fmt_with_trailing_pri(fmt_literal: str) -> str:
    # A format that ends with a PRI macro, e.g. `"offset 0x%" PRIx64`: put the macro's conversion back.
    m = re.search(r'PRI([diouxX])(8|16|32|64|PTR|MAX)\s*$', fmt_literal.strip())
    text = _c_string(fmt_literal)
    if m:
        text += ("ll" + m.group(1)) if m.group(2) == "64" else m.group(1)
    return text


def parse_event_line(line: str, lineno: int = 0, filename: str = "") -> TraceEvent:
    m = re.match(_EVENT_RE, line)
    if m is None:
        raise ValueError("not an event declaration")
    g = m.groupdict("")
    props = g["props"].split()
    unknown = set(props) - _VALID_PROPS
    if unknown:
        raise ValueError(f"unknown properties: {', '.join(sorted(unknown))}")
    args = _parse_args(g["args"])
    if len(args) > 10:
        raise ValueError(f"event '{g['name']}' has more than 10 arguments")
    fmt = _fmt_with_trailing_pri(g["fmt"]) if g["fmt"] else ""
    if "vcpu" in props:
        args = [EventArg("void *", "__cpu"), *args]
        fmt = "cpu=%p " + fmt
    return TraceEvent(g["name"], args, fmt, props, lineno, filename)


class EventsFile:
    """The events of a trace-events file, by name. Lines are parsed when an event is first asked for."""

    def __init__(self, events: Iterable[TraceEvent] = (), path: str = "") -> None:
        self.path = path
        self._parsed: dict[str, TraceEvent] = {}
        self._raw: Optional[dict[str, tuple[int, str]]] = None
        self._text: Optional[str] = None
        self._names: Optional[set[str]] = None
        for e in events:
            self._parsed[e.name] = e

    @classmethod
    def from_text(cls, text: str, filename: str = "<events>") -> EventsFile:
        ef = cls((), filename)
        ef._text = text
        # check the first declaration now, so that a file of garbage fails early with one clear line
        for lineno, line in enumerate(text[:65536].splitlines()[:200], 1):
            s = line.strip()
            if not s or s[0] == "#":
                continue
            try:
                parse_event_line(s, lineno, filename)
            except ValueError as exc:
                raise BadInputError(f"{filename}:{lineno}: not a trace-events file: {exc}") from None
            break
        else:
            raise BadInputError(f"{filename}: no trace events declared in it (not a trace-events file?)")
        return ef

    def _index(self) -> dict[str, tuple[int, str]]:
        if self._raw is None:
            raw: dict[str, tuple[int, str]] = {}
            for lineno, line in enumerate((self._text or "").splitlines(), 1):
                s = line.strip()
                if not s or s[0] == "#" or "(" not in s:
                    continue
                head = s.split("(", 1)[0].split()
                if head:
                    raw[head[-1]] = (lineno, s)
            self._raw = raw
        return self._raw

    def _find_line(self, name: str) -> Optional[tuple[int, str]]:
        """The declaration of one event, found with str.find (no full index for a few look-ups)."""
        if self._raw is not None or self._text is None:
            return self._index().get(name)
        text = self._text
        needle = name + "("
        start = 0
        while True:
            i = text.find(needle, start)
            if i < 0:
                return None
            ls = text.rfind("\n", 0, i) + 1
            prefix = text[ls:i]
            if prefix.strip() == "" or (prefix[-1:].isspace() and set(prefix.split()) <= _VALID_PROPS):
                le = text.find("\n", i)
                line = text[ls : le if le >= 0 else len(text)].strip()
                return text.count("\n", 0, ls) + 1, line
            start = i + 1

    def _parse(self, name: str) -> Optional[TraceEvent]:
        e = self._parsed.get(name)
        if e is not None:
            return e
        raw = self._find_line(name)
        if raw is None:
            return None
        lineno, line = raw
        try:
            e = parse_event_line(line, lineno, self.path)
        except ValueError as exc:
            raise BadInputError(f"{self.path}:{lineno}: not a trace-events file: {exc}") from None
        self._parsed[name] = e
        return e

    def name_set(self) -> set[str]:
        """Every event name the file declares (found with one regular expression over the text)."""
        if self._names is None:
            found = set(re.findall(_DECL_NAME_RE, "\n" + (self._text or "")))
            self._names = found | set(self._parsed)
        return self._names

    def names(self) -> list[str]:
        return list(dict.fromkeys([*self._parsed, *self._index()]))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._parse(name) is not None

    def __getitem__(self, name: str) -> TraceEvent:
        e = self._parse(name)
        if e is None:
            raise KeyError(name)
        return e

    def get(self, name: str) -> Optional[TraceEvent]:
        return self._parse(name)

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator[TraceEvent]:
        for n in self.names():
            yield self[n]


# --- which QEMU wrote an events file --------------------------------------------------------------

VERIFIED_SERIES = ("7.2", "10.0")
"""QEMU versions whose simpletrace.py output `virtopt trace decode` is checked against (tests, bench)."""

# Lines only a QEMU before 8.x writes, which 10.0's tracetool rejects: the ``vcpu`` property
# (removed with the per-vCPU trace state) and a format with a new line in it (10.0's
# scripts/tracetool/__init__.py Event.build: "Event format must not use new line character").
# Found with substring searches: a regular expression over the 500 KB of 10.0's file takes
# tens of milliseconds, more than decoding a trace of 400,000 events.


def _has_old_qemu_lines(text: str) -> bool:
    t = "\n" + text
    for marker in ("\nvcpu ", "\ndisable vcpu ", "\n\tvcpu ", "\n vcpu "):
        if marker in t:
            return True
    i = text.find("\\n")
    while i >= 0:
        ls = text.rfind("\n", 0, i) + 1
        line = text[ls:i].lstrip()
        if line and line[0] != "#" and "(" in line and ")" in line and '"' in line.split(")", 1)[-1]:
            return True
        i = text.find("\\n", i + 2)
    return False


def qemu_series(ef: EventsFile) -> str:
    """The QEMU series whose simpletrace.py goes with this events file, told by its content.

    ``"7.2"`` when the file has what 7.2 writes and 10.0 refuses (a ``vcpu`` event or a format
    with ``\\n``: 7.2's trace-events-all has both), otherwise ``"10.0"`` (the current form).
    A small events file with neither cannot be told apart: `--qemu-compat` chooses.
    """
    cached = getattr(ef, "_series", None)
    if cached is not None:
        return cached
    text = ef._text
    if text is None:  # built from TraceEvent objects
        old = any("vcpu" in e.properties or "\n" in e.fmt for e in ef._parsed.values())
    else:
        old = _has_old_qemu_lines(text)
    ef._series = "7.2" if old else "10.0"  # type: ignore[attr-defined]
    return ef._series  # type: ignore[attr-defined]


def parse_events(text: str, filename: str = "<events>") -> EventsFile:
    """Parse the text of a trace-events file; a bad line is one clear BadInputError (when it is used)."""
    return EventsFile.from_text(text, filename)


def load_events(path: Union[str, os.PathLike]) -> EventsFile:
    """Read a trace-events(-all) file; CONTRIBUTING.md's one line for each bad condition."""
    import stat

    from qemu_ext.errors import binary_file, empty_file, not_a_file, open_error

    p = Path(path)
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, os.strerror(21))
        if not stat.S_ISREG(st.st_mode):
            raise not_a_file(p)
        if st.st_size > 64 << 20:
            raise BadInputError(f"{p}: {st.st_size} bytes is too large for a trace-events file")
        data = p.read_bytes()
    except OSError as exc:
        raise open_error(p, exc) from None
    if not data:
        raise empty_file(p)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise binary_file(p, "trace-events file") from None
    if "\0" in text:
        raise binary_file(p, "trace-events file")
    return parse_events(text, str(p))


def _candidates(more: bool = True) -> Iterator[Path]:
    env = os.environ.get("VIRTOPT_TRACE_EVENTS")
    if env:
        yield Path(env)
    for p in SYSTEM_EVENTS_FILES:
        yield Path(p)
    if not more:
        return
    try:  # the QEMUs virtopt installed for its tests and demo (10.0 in a private prefix, debug builds)
        from qemu_ext.vm import qemu_builds

        builds = qemu_builds()
    except Exception:  # a broken cache must not stop decoding
        builds = []
    for b in builds:
        if b.trace_events is not None:
            yield b.trace_events


def find_events_file() -> Path:
    """The trace-events-all of the QEMU in use: $VIRTOPT_TRACE_EVENTS, /usr/share/qemu, virtopt's QEMU builds."""
    for c in _candidates():
        if c.is_file():
            return c
    raise NotAvailableError(
        "no trace-events-all found (looked in /usr/share/qemu and virtopt's QEMU builds): pass --events FILE"
    )


_DEFAULT: dict[str, EventsFile] = {}


def default_events() -> EventsFile:
    return _load_cached(str(find_events_file()))


def _load_cached(p: str) -> EventsFile:
    if p not in _DEFAULT:
        _DEFAULT[p] = load_events(p)
    return _DEFAULT[p]


def events_for_trace(events_file: Union[str, os.PathLike, EventsFile, None], mapped: Iterable[str]) -> EventsFile:
    """The events file to decode a simpletrace file with: the one given, else the first installed
    trace-events-all that declares every event the trace's mapping records name (a QEMU writes a
    mapping for each event it has, so 7.2's and 10.0's traces each find their own QEMU's file)."""
    if events_file is not None:
        return get_events(events_file)
    names = list(mapped)
    first: Optional[EventsFile] = None
    seen: set[str] = set()
    for more in (False, True):
        for c in _candidates(more):
            key = str(c)
            if key in seen or not c.is_file():
                continue
            seen.add(key)
            ef = _load_cached(key)
            if first is None:
                first = ef
            declared = ef.name_set()
            if all(n in declared for n in names):
                return ef
    if first is None:
        raise NotAvailableError(
            "no trace-events-all found (looked in /usr/share/qemu and virtopt's QEMU builds): pass --events FILE"
        )
    return first


def get_events(events_file: Union[str, os.PathLike, EventsFile, None] = None) -> EventsFile:
    """An EventsFile from a path, an EventsFile, or the default trace-events-all."""
    if isinstance(events_file, EventsFile):
        return events_file
    if events_file is None:
        return default_events()
    return load_events(events_file)
