"""QEMU's own QMP schema (query-qmp-schema), indexed: command and argument names, types, enum values,
the help of one command, and the check of a command line against it before it is sent.

The introspection format is QEMU's docs/devel/qapi-code-gen.rst "Client JSON Protocol introspection"
(SchemaInfo: meta-type command/object/enum/alternate/array/builtin; the same in 7.2 and 10.0).
Type names are masked in introspection ("1", "2", ...): only builtins ("str", "int", "bool",
"number", "null", "any") keep their names, so a type is described by what it is, not its name.
Doc comments are not part of the introspection: help shows types, required, enum values and
features (deprecated, unstable).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from qemu_ext.errors import BadInputError

MAX_DEPTH = 6

# qemu-img / QEMU size suffixes (qemu_strtosz: k, M, G, T, P, E; powers of 1024; "1.5G" allowed)
_SIZE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)(?P<suf>[kKmMgGtTpPeE])(?:i?[bB])?$")
_SUFFIX = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


class SchemaError(BadInputError):
    """A line does not fit QEMU's schema (unknown command or argument); nothing was sent.

    ``error_class`` is the class QEMU would have answered (CommandNotFound, GenericError), for JSON output."""

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


@dataclass
class ArgHelp:
    name: str  # dotted for nested members (file.filename)
    type: str  # str, int, bool, number, any, enum, object, array of ..., one of ...
    required: bool
    values: list[str] = field(default_factory=list)  # enum values
    features: list[str] = field(default_factory=list)
    variant: str = ""  # "driver=qcow2" for members of a union's variant

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "required": self.required, "values": self.values,
                "features": self.features, "variant": self.variant}


@dataclass
class CommandHelp:
    name: str
    arguments: list[ArgHelp]
    returns: str
    features: list[str]
    allow_oob: bool
    tag: str = ""  # the discriminator of a union argument type (blockdev-add: driver)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": [a.to_dict() for a in self.arguments], "returns": self.returns,
                "features": self.features, "allow-oob": self.allow_oob, "tag": self.tag}


@dataclass
class SchemaIndex:
    """query-qmp-schema, indexed by name."""

    entities: dict[str, dict[str, Any]]
    commands: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    @classmethod
    def from_schema(cls, schema: Iterable[dict[str, Any]]) -> SchemaIndex:
        ents = {str(e["name"]): e for e in schema if isinstance(e, dict) and "name" in e}
        cmds = sorted(n for n, e in ents.items() if e.get("meta-type") == "command")
        evs = sorted(n for n, e in ents.items() if e.get("meta-type") == "event")
        return cls(ents, cmds, evs)

    # -- types ----------------------------------------------------------------------------------------

    def members(self, type_name: Optional[str], chosen: Optional[dict[str, Any]] = None,
                depth: int = 0) -> dict[str, dict[str, Any]]:
        """Member name -> its SchemaInfoObjectMember of an object type; a flat union's variants are chosen by
        the tag's value typed so far (all of them while it is not typed). Alternates: the object branches."""
        chosen = chosen or {}
        ent = self.entities.get(type_name or "")
        if ent is None or depth > MAX_DEPTH:
            return {}
        if ent.get("meta-type") == "alternate":
            out: dict[str, dict[str, Any]] = {}
            for m in ent.get("members", []):
                out.update(self.members(m["type"], chosen, depth + 1))
            return out
        if ent.get("meta-type") != "object":
            return {}
        out = {m["name"]: m for m in ent.get("members", [])}
        tag = ent.get("tag")
        variants = ent.get("variants", [])
        if tag and variants:
            value = chosen.get(tag)
            picked = [v for v in variants if v["case"] == value] if value is not None else variants
            for v in picked:
                for name, m in self.members(v["type"], chosen, depth + 1).items():
                    out.setdefault(name, m)
        return out

    def _members_types(self, type_name: Optional[str], chosen: dict[str, Any]) -> dict[str, str]:
        return {n: m["type"] for n, m in self.members(type_name, chosen).items()}

    def meta(self, type_name: Optional[str]) -> str:
        return str(self.entities.get(type_name or "", {}).get("meta-type", ""))

    def command_arg_type(self, command: str) -> Optional[str]:
        ent = self.entities.get(command)
        if not ent or ent.get("meta-type") != "command":
            return None
        return ent.get("arg-type")

    def has_command(self, command: str) -> bool:
        return command in self.commands

    def arg_names(self, command: str, typed: Optional[dict[str, Any]] = None) -> list[str]:
        """Top-level argument names of a command."""
        return sorted(self.members(self.command_arg_type(command), typed))

    def resolve(self, command: str, dotted: str, typed: Optional[dict[str, Any]] = None) -> Optional[str]:
        """Type name of ``a.b.c`` in the command's arguments (None when unknown)."""
        t = self.command_arg_type(command)
        sub: Any = typed or {}
        for part in dotted.split("."):
            if t is None:
                return None
            t = self._members_types(t, sub if isinstance(sub, dict) else {}).get(part)
            sub = sub.get(part, {}) if isinstance(sub, dict) else {}
        return t

    def member(self, command: str, dotted: str, typed: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
        """The SchemaInfoObjectMember of ``a.b.c`` (name, type, default, features), or None."""
        head, _, last = dotted.rpartition(".")
        t = self.resolve(command, head, typed) if head else self.command_arg_type(command)
        sub: Any = typed or {}
        for part in head.split(".") if head else []:
            sub = sub.get(part, {}) if isinstance(sub, dict) else {}
        return self.members(t, sub if isinstance(sub, dict) else {}).get(last)

    def keys_under(self, command: str, prefix: str, typed: Optional[dict[str, Any]] = None) -> list[str]:
        """Argument keys to offer for a partially typed key: ``file.`` -> ``file.driver=``, ``file.filename=``, ...

        Object-typed members are offered with a trailing dot so the user can go deeper.
        """
        typed = typed or {}
        head, _, _ = prefix.rpartition(".")
        if head:
            t = self.resolve(command, head, typed)
            sub: Any = typed
            for part in head.split("."):
                sub = sub.get(part, {}) if isinstance(sub, dict) else {}
            members = self._members_types(t, sub if isinstance(sub, dict) else {}) if t else {}
            base = head + "."
        else:
            members = self._members_types(self.command_arg_type(command), typed)
            base = ""
        out = []
        for name, mt in sorted(members.items()):
            key = base + name
            if self.is_object(mt) and not self._has_scalar(mt):
                out.append(key + ".")
            else:
                out.append(key + "=")
                if self.is_object(mt):
                    out.append(key + ".")
        return [k for k in out if k.startswith(prefix)]

    def is_object(self, type_name: str) -> bool:
        ent = self.entities.get(type_name, {})
        if ent.get("meta-type") == "object":
            return True
        if ent.get("meta-type") == "alternate":
            return any(self.is_object(m["type"]) for m in ent.get("members", []))
        return False

    def _has_scalar(self, type_name: str) -> bool:
        ent = self.entities.get(type_name, {})
        if ent.get("meta-type") == "alternate":
            return any(not self.is_object(m["type"]) for m in ent.get("members", []))
        return ent.get("meta-type") != "object"

    def values_of(self, type_name: Optional[str]) -> list[str]:
        """Literal values a type takes: enum values, true/false (also inside alternates)."""
        if type_name is None:
            return []
        ent = self.entities.get(type_name, {})
        mt = ent.get("meta-type")
        if mt == "enum":
            vals = ent.get("values") or [m["name"] for m in ent.get("members", [])]
            return [str(v) for v in vals]
        if (mt == "builtin" and ent.get("json-type") == "boolean") or type_name == "bool":
            return ["true", "false"]
        if mt == "alternate":
            out: list[str] = []
            for m in ent.get("members", []):
                for v in self.values_of(m["type"]):
                    if v not in out:
                        out.append(v)
            return out
        return []

    def describe(self, type_name: Optional[str], depth: int = 0) -> str:
        """What a (masked) type is: str, int, bool, enum, object, array of int, one of str|object, ..."""
        ent = self.entities.get(type_name or "", {})
        mt = ent.get("meta-type")
        if mt == "builtin":
            return str(ent.get("name", type_name))
        if mt == "array" and depth < MAX_DEPTH:
            return f"array of {self.describe(ent.get('element-type'), depth + 1)}"
        if mt == "alternate" and depth < MAX_DEPTH:
            return "one of " + "|".join(self.describe(m["type"], depth + 1) for m in ent.get("members", []))
        return str(mt or type_name or "?")

    # -- help -----------------------------------------------------------------------------------------

    def command_help(self, command: str) -> CommandHelp:
        ent = self.entities.get(command)
        if not ent or ent.get("meta-type") != "command":
            raise self.unknown_command(command)
        t = ent.get("arg-type")
        args: list[ArgHelp] = []
        tag = str(self.entities.get(t or "", {}).get("tag") or "")
        self._collect(t, "", args, 0, set())
        return CommandHelp(command, args, self.describe(ent.get("ret-type")), list(ent.get("features", [])),
                           bool(ent.get("allow-oob")), tag)

    def _collect(self, type_name: Optional[str], prefix: str, out: list[ArgHelp], depth: int, seen: set[str],
                 variant: str = "") -> None:
        ent = self.entities.get(type_name or "")
        if ent is None or ent.get("meta-type") != "object" or depth > 2 or (type_name or "") in seen:
            return
        seen = seen | {type_name or ""}
        for m in ent.get("members", []):
            mt = m["type"]
            out.append(ArgHelp(prefix + m["name"], self.describe(mt), "default" not in m, self.values_of(mt),
                               list(m.get("features", [])), variant))
            if self.meta(mt) == "object" and depth < 1:
                self._collect(mt, prefix + m["name"] + ".", out, depth + 1, seen, variant)
        tag = ent.get("tag")
        for v in ent.get("variants", []):
            self._collect(v["type"], prefix, out, depth + 1, seen, f"{prefix}{tag}={v['case']}")

    def unknown_command(self, command: str) -> SchemaError:
        import difflib

        near = difflib.get_close_matches(command, self.commands, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(near)}?" if near else "; 'help' lists the built-ins, Tab completes commands"
        return SchemaError(f"QEMU has no command {command!r}{hint}", "CommandNotFound")

    # -- checking a line ------------------------------------------------------------------------------

    def check(self, command: str, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Check a command and its arguments before they are sent; return the arguments as QEMU wants them
        and notes on what was converted. SchemaError (nothing sent) for an unknown command or argument.

        Converted: a number or boolean given where the schema wants a string is sent as a string
        (``name=123``), a size with a suffix where it wants an integer (``size=1G``) as bytes."""
        if not self.entities:
            return args, []  # only query-commands was available: no types to check against
        if not self.has_command(command):
            raise self.unknown_command(command)
        notes: list[str] = []
        out = self._check_obj(command, self.command_arg_type(command), args, "", notes, 0)
        return out, notes

    def _check_obj(self, command: str, type_name: Optional[str], value: dict[str, Any], prefix: str,
                   notes: list[str], depth: int) -> dict[str, Any]:
        meta = self.meta(type_name)
        if type_name is None and value:
            raise SchemaError(f"{command} takes no arguments (got {', '.join(prefix + k for k in value)})")
        if meta != "object" or depth > MAX_DEPTH:
            return value
        members = self.members(type_name, value)
        out = {}
        for k, v in value.items():
            m = members.get(k)
            if m is None and not members:
                raise SchemaError(f"{command} takes no arguments{' under ' + prefix.rstrip('.') if prefix else ''} "
                                  f"(got {prefix}{k})")
            if m is None:
                import difflib

                valid = ", ".join(sorted(members))
                near = difflib.get_close_matches(k, list(members), n=1)
                hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
                raise SchemaError(f"{command} has no argument {prefix}{k!r}{hint}; "
                                  f"{'its arguments' if not prefix else prefix.rstrip('.') + ' takes'}: {valid}")
            out[k] = self._check_value(command, m["type"], v, prefix + k, notes, depth)
        return out

    def _check_value(self, command: str, type_name: str, v: Any, key: str, notes: list[str], depth: int) -> Any:
        ent = self.entities.get(type_name, {})
        mt = ent.get("meta-type")
        if mt == "object" and isinstance(v, dict):
            return self._check_obj(command, type_name, v, key + ".", notes, depth + 1)
        if mt == "builtin":
            jt = ent.get("json-type")
            if jt == "string" and isinstance(v, (int, float)) and not isinstance(v, bool):
                return str(v)
            if jt == "string" and isinstance(v, bool):
                return "true" if v else "false"
            if jt == "int" and isinstance(v, str):
                n = parse_size(v)
                if n is not None:
                    notes.append(f"{key}={v} sent as {n}")
                    return n
        if mt == "alternate" and isinstance(v, dict):
            obj = next((m["type"] for m in ent.get("members", []) if self.meta(m["type"]) == "object"), None)
            if obj is not None:
                return self._check_obj(command, obj, v, key + ".", notes, depth + 1)
        if mt == "alternate" and isinstance(v, str):
            kinds = {self.entities.get(m["type"], {}).get("json-type") for m in ent.get("members", [])}
            if "int" in kinds and "string" not in kinds:
                n = parse_size(v)
                if n is not None:
                    notes.append(f"{key}={v} sent as {n}")
                    return n
        if mt == "enum" and isinstance(v, (int, bool)) and not isinstance(v, bool):
            return str(v)
        return v


def parse_size(text: str) -> Optional[int]:
    """``64k`` / ``1G`` / ``1.5G`` / ``2MiB`` -> bytes (qemu_strtosz's suffixes); None when not a size."""
    m = _SIZE.match(text)
    if not m:
        return None
    return int(float(m["num"]) * (1 << _SUFFIX[m["suf"].lower()]))
