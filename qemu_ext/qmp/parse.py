"""Input parsing compatible with QEMU's qmp-shell.

- ``cmd key=value key.sub=value``: values are ints, ``true``/``false``, JSON or Python
  literals (``{...}``, ``[...]``), else plain strings (``none`` and ``null`` stay strings, as
  in qmp-shell: ``sync=none`` is an enum value); dotted keys build nested objects.
  Beyond qmp-shell: quoted values are unquoted (``'a b'`` -> ``a b``), ``0x10`` and ``1.5``
  are numbers, and dotted keys may come in any order (qmp-shell 0.0.6 nests every key after
  the first dotted one).
- ``transaction(`` ... ``)`` over several lines (one action per line:
  ``type key=value ...``), or on one line ``transaction( type key=value )``.
- a raw JSON line ``{"execute": ...}`` is sent as is.
- ``/name args...`` is a built-in (shell-split), never a QMP command.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from qemu_ext.errors import BadInputError

# qmp-shell's tokeniser: runs of non-space, with single- or double-quoted parts kept together
_TOKEN = re.compile(r"""(?:[^\s"']|"(?:\\.|[^"])*"|'(?:\\.|[^'])*')+""")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


class ParseError(BadInputError):
    """The line is not valid shell input."""


@dataclass
class QmpCommand:
    """A QMP message to send: ``{"execute": ..., "arguments": {...}}``."""

    msg: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.msg.get("execute", self.msg.get("exec-oob", "")))


@dataclass
class BuiltinCommand:
    name: str
    args: list[str] = field(default_factory=list)
    line: str = ""


Parsed = Union[QmpCommand, BuiltinCommand, None]


class _FuzzyJSON(ast.NodeTransformer):
    """true/false/null as Python names -> True/False/None (qmp-shell's FuzzyJSON)."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        consts = {"true": True, "false": False, "null": None}
        if node.id in consts:
            return ast.Constant(value=consts[node.id])
        return node


def parse_value(text: str) -> Any:
    """A value of ``key=value`` the way qmp-shell reads it (plus quoted strings and floats)."""
    try:
        return int(text, 0) if re.match(r"^[+-]?(0[xX][0-9a-fA-F]+|\d+)$", text) else int(text)
    except ValueError:
        pass
    low = text.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if _FLOAT.match(text):
        return float(text)
    if text[:1] in "{[\"'" and text:
        try:
            return json.loads(text)
        except ValueError:
            pass
        try:
            tree = ast.parse(text, mode="eval")
            return ast.literal_eval(_FuzzyJSON().visit(tree))
        except (SyntaxError, ValueError):
            if text[:1] in "{[":
                raise ParseError(f"cannot parse value {text!r} as JSON or a Python literal") from None
    return text


def set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    """``a.b.c=1`` -> ``{"a": {"b": {"c": 1}}}``, refusing leaf/non-leaf clashes and repeats."""
    if not key or any(not part for part in key.split(".")):
        raise ParseError(f"bad argument name {key!r}")
    parts = key.split(".")
    cur = target
    path: list[str] = []
    for part in parts[:-1]:
        path.append(part)
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ParseError(f'cannot use "{".".join(path)}" as both leaf and non-leaf key')
        cur = nxt
    leaf = parts[-1]
    if leaf in cur:
        if isinstance(cur[leaf], dict):
            raise ParseError(f'cannot use "{key}" as both leaf and non-leaf key')
        raise ParseError(f'cannot set "{key}" multiple times')
    cur[leaf] = value


def parse_args(tokens: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tok in tokens:
        key, sep, val = tok.partition("=")
        if not sep:
            raise ParseError(f"expected a key=value pair, got {tok!r}")
        set_dotted(out, key, parse_value(val))
    return out


def tokenize(line: str) -> list[str]:
    return _TOKEN.findall(line)


def parse_json_line(line: str) -> QmpCommand:
    try:
        obj = json.loads(line)
    except ValueError:
        try:
            obj = ast.literal_eval(_FuzzyJSON().visit(ast.parse(line, mode="eval")))
        except (SyntaxError, ValueError) as exc:
            raise ParseError(f"not a JSON object: {exc}") from None
    if not isinstance(obj, dict) or not ({"execute", "exec-oob"} & obj.keys()):
        raise ParseError('a raw JSON line must be an object with "execute" (or "exec-oob")')
    return QmpCommand(obj)


class LineParser:
    """Stateful (for multi-line ``transaction(``) parser of shell lines."""

    def __init__(self) -> None:
        self.in_transaction = False
        self.actions: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.in_transaction = False
        self.actions = []

    def parse(self, line: str) -> Parsed:
        """Return what to run for this line, or None (empty line, or a transaction still open)."""
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            return None
        if not self.in_transaction and stripped.startswith("/"):
            import shlex

            try:
                argv = shlex.split(stripped)
            except ValueError as exc:
                raise ParseError(f"{exc}") from None
            return BuiltinCommand(argv[0][1:], argv[1:], stripped)
        if not self.in_transaction and stripped.startswith("{"):
            return parse_json_line(stripped)
        tokens = tokenize(stripped)
        if tokens and tokens[0] == "transaction(":
            self.in_transaction = True
            self.actions = []
            tokens.pop(0)
        elif tokens and tokens[0].startswith("transaction(") and len(tokens[0]) > len("transaction("):
            self.in_transaction = True
            self.actions = []
            tokens[0] = tokens[0][len("transaction("):]
        if not self.in_transaction:
            return QmpCommand({"execute": tokens[0], "arguments": parse_args(tokens[1:])})
        finish = False
        if tokens and tokens[-1] == ")":
            tokens.pop()
            finish = True
        elif tokens and tokens[-1].endswith(")") and "=" not in tokens[-1]:
            tokens[-1] = tokens[-1][:-1]
            finish = True
        if tokens:
            try:
                self.actions.append({"type": tokens[0], "data": parse_args(tokens[1:])})
            except ParseError:
                self.reset()
                raise
        if not finish:
            return None
        actions, self.actions, self.in_transaction = self.actions, [], False
        return QmpCommand({"execute": "transaction", "arguments": {"actions": actions}})


def parse_line(line: str) -> Optional[QmpCommand | BuiltinCommand]:
    """One-shot parse of a single line (a transaction must then open and close on it)."""
    p = LineParser()
    out = p.parse(line)
    if p.in_transaction:
        raise ParseError("transaction( is not closed with )")
    return out
