"""Workloads for the L2-cache simulator: synthetic request streams, qemu-io command files, and
captured QEMU traces (log-backend text or simpletrace files) at slice level
(qcow2_cache_get*) or request level (qcow2_writev_start_req, qcow2_add_task)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.l2cache.options import parse_size

PATTERNS = ("sequential", "uniform", "zipf", "hotset")


@dataclass
class Workload:
    """Guest requests: op ('r'/'w'), offset, length; optional timestamps (ns)."""

    ops: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    timestamps: Optional[list[int]] = None
    source: str = ""
    # when the image was opened, on the timestamps' clock (None: at the first request)
    opened_ns: Optional[int] = None

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        return iter(zip(self.ops, self.offsets, self.lengths))

    def describe(self) -> dict:
        return {
            "source": self.source,
            "requests": len(self),
            "reads": sum(1 for o in self.ops if o == "r"),
            "writes": sum(1 for o in self.ops if o == "w"),
            "bytes": int(sum(self.lengths)),
        }


MAX_SYNTHETIC_REQUESTS = 200_000_000


def synthetic(
    virtual_size: int,
    pattern: str = "uniform",
    count: int = 10000,
    request_size: int = 4096,
    working_set: Optional[int] = None,
    read_ratio: float = 1.0,
    seed: int = 0,
    zipf_s: float = 1.1,
    hot_fraction: float = 0.1,
    hot_probability: float = 0.9,
) -> Workload:
    """A reproducible request stream over the first `working_set` bytes of the disk.

    sequential: back-to-back requests wrapping around the working set; uniform: random aligned
    offsets; zipf: offsets ranked by a Zipf(s) law over request-sized blocks (block ranks are a
    seeded permutation so hot blocks are scattered); hotset: `hot_probability` of the requests go
    to a random `hot_fraction` of the blocks.
    """
    if pattern not in PATTERNS:
        raise BadInputError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    if request_size <= 0 or request_size % 512:
        raise BadInputError("request size must be a positive multiple of 512")
    ws = virtual_size if working_set is None else min(working_set, virtual_size)
    nblocks = ws // request_size
    if nblocks < 1:
        raise BadInputError("the working set is smaller than one request")
    if count < 0:
        raise BadInputError("count must not be negative")
    if count > MAX_SYNTHETIC_REQUESTS:
        # each request costs some tens of bytes in the arrays below: refuse before allocating
        raise BadInputError(f"count {count} is too large (at most {MAX_SYNTHETIC_REQUESTS:,} requests)")
    if not 0.0 <= read_ratio <= 1.0:
        raise BadInputError("read ratio must be between 0 and 1")
    rng = np.random.default_rng(seed)

    def scatter(rank: np.ndarray) -> np.ndarray:
        # a seeded bijection of [0, nblocks) (affine map with a multiplier coprime to nblocks),
        # so hot ranks land all over the working set without an O(nblocks) permutation
        a = int(rng.integers(1, max(2, nblocks)))
        while np.gcd(a, nblocks) != 1:
            a += 1
        b = int(rng.integers(0, nblocks))
        return (rank.astype(object) * a + b) % nblocks if nblocks > 2**31 else (rank * a + b) % nblocks

    if pattern == "sequential":
        blocks = np.arange(count, dtype=np.int64) % nblocks
    elif pattern == "uniform":
        blocks = rng.integers(0, nblocks, size=count, dtype=np.int64)
    elif pattern == "zipf":
        ranks = np.arange(1, min(nblocks, 1 << 22) + 1, dtype=np.float64)
        p = ranks ** (-zipf_s)
        p /= p.sum()
        blocks = scatter(rng.choice(len(ranks), size=count, p=p).astype(np.int64))
    else:
        nhot = max(1, int(nblocks * hot_fraction))
        hot = rng.random(count) < hot_probability
        blocks = np.where(hot, scatter(rng.integers(0, nhot, size=count)), rng.integers(0, nblocks, size=count))
    blocks = np.asarray(blocks, dtype=np.int64)
    is_read = rng.random(count) < read_ratio
    offs = (blocks * request_size).tolist()
    return Workload(
        ops=["r" if r else "w" for r in is_read.tolist()],
        offsets=offs,
        lengths=[request_size] * count,
        source=f"synthetic {pattern}",
    )


# -------------------------------------------------------------------------------- qemu-io files
_QIO_READ = {"read", "aio_read", "readv", "r"}
_QIO_WRITE = {"write", "aio_write", "writev", "w"}
# options of qemu-io read/write that take an argument
_QIO_ARG_OPTS = {"-P", "-l", "-s", "-C"}


def parse_qemu_io(lines: Iterable[str], source: str = "qemu-io commands") -> Workload:
    """qemu-io commands as given on stdin or with -c: read/write/readv/writev/aio_*; `sleep MS`
    advances the clock (requests get timestamps from it, so cache-clean-interval applies; the
    commands themselves are taken as instantaneous); the rest (quit, flush, ...) are skipped;
    `-z` (write zeroes) and `-c` (compressed) writes are refused because their lookups differ."""
    w = Workload(source=source, timestamps=[], opened_ns=0)
    now_ns = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise BadInputError(f"{source}:{lineno}: {exc}") from None
        cmd = words[0]
        if cmd == "sleep":
            try:
                now_ns += int(words[1]) * 1_000_000
            except (IndexError, ValueError):
                raise BadInputError(f"{source}:{lineno}: 'sleep' needs milliseconds") from None
            continue
        if cmd in ("quit", "q", "exit", "flush", "f", "aio_flush", "help", "open", "close", "info"):
            continue
        if cmd not in _QIO_READ and cmd not in _QIO_WRITE:
            raise BadInputError(f"{source}:{lineno}: unsupported qemu-io command {cmd!r}")
        args = []
        i = 1
        while i < len(words):
            a = words[i]
            if a in ("-z", "-c", "-u") and cmd in _QIO_WRITE:
                raise BadInputError(f"{source}:{lineno}: '{cmd} {a}' is not modelled (zero/compressed writes)")
            if a in _QIO_ARG_OPTS:
                i += 2
                continue
            if a.startswith("-") and not a[1:2].isdigit():
                i += 1
                continue
            args.append(a)
            i += 1
        if len(args) < 2:
            raise BadInputError(f"{source}:{lineno}: '{line}' needs an offset and a length")
        try:
            off = parse_size(args[0])
            n = sum(parse_size(a) for a in args[1:]) if cmd in ("readv", "writev") else parse_size(args[1])
        except BadInputError as exc:
            raise BadInputError(f"{source}:{lineno}: {exc}") from None
        w.ops.append("r" if cmd in _QIO_READ else "w")
        w.offsets.append(off)
        w.lengths.append(n)
        w.timestamps.append(now_ns)  # type: ignore[union-attr]
    return w


def read_qemu_io_file(path: str | Path) -> Workload:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise BadInputError(f"cannot read {path}: {exc.strerror}") from None
    return parse_qemu_io(text.splitlines(), source=str(path))


# -------------------------------------------------------------------------------- traces
@dataclass
class TraceLookup:
    """One qcow2_cache_get as the trace recorded it."""

    is_l2: bool
    offset: int
    read_from_disk: bool
    index: int = -1
    hit: bool = True
    timestamp_ns: Optional[int] = None


# the trace engineer's decoders key arguments by their declared names (qcow2_cache_get's `c`
# is the log's `is_l2_cache`, `i` its `index`); this module uses the log words
_ARG_WORDS = {"c": "is_l2_cache", "i": "index"}
_PROMPT = "qemu-io> "


def _normalise(records) -> Iterator[tuple[str, dict[str, str], Optional[int]]]:
    for rec in records:
        args = {_ARG_WORDS.get(k, k): str(v) for k, v in dict(rec.args).items()}
        yield rec.name, args, getattr(rec, "timestamp_ns", None)


def _strip_prompt(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        # qemu-io's prompt prefixes the first event printed while a command runs
        while line.startswith(_PROMPT):
            line = line[len(_PROMPT) :]
        yield line


def _records_from_log(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, str], Optional[int]]]:
    from qemu_ext.trace import parse_log_lines

    try:
        yield from _normalise(parse_log_lines(_strip_prompt(lines)))
    except ValueError as exc:
        raise BadInputError(f"malformed trace: {exc}") from None


def _records_from_simpletrace(path: Path) -> Iterator[tuple[str, dict[str, str], Optional[int]]]:
    from qemu_ext.trace import read_trace

    yield from _normalise(read_trace(str(path)))


def _int(v: str) -> int:
    return int(str(v), 0)


def parse_cache_trace(records: Iterable[tuple[str, dict[str, str], Optional[int]]]) -> list[TraceLookup]:
    """Pair qcow2_cache_get with its replace_entry/get_read/get_done per coroutine and cache."""
    out: list[TraceLookup] = []
    pending: dict[tuple[str, str], TraceLookup] = {}
    for name, a, ts in records:
        if not name.startswith("qcow2_cache_get"):
            continue
        key = (a.get("co", "?"), a.get("is_l2_cache", "?"))
        try:
            if name == "qcow2_cache_get":
                t = TraceLookup(a["is_l2_cache"] == "1", _int(a["offset"]), a.get("read_from_disk", "1") == "1", timestamp_ns=ts)
                pending[key] = t
                out.append(t)
            elif name in ("qcow2_cache_get_replace_entry", "qcow2_cache_get_read"):
                t = pending.get(key)
                if t is not None:
                    t.hit = False
                    t.index = _int(a["index"])
            elif name == "qcow2_cache_get_done":
                t = pending.pop(key, None)
                if t is not None:
                    t.index = _int(a["index"])
        except (KeyError, ValueError) as exc:
            raise BadInputError(f"malformed {name} trace record: {exc}") from None
    return out


def parse_request_trace(records: Iterable[tuple[str, dict[str, str], Optional[int]]]) -> Workload:
    """Request-level events: qcow2_writev_start_req (a guest write) and qcow2_add_task with
    action 'read' (a piece of a guest read that reads data; pieces that read as zeroes have no
    task, so their lookups are not seen)."""
    w = Workload(source="request trace", timestamps=[])
    for name, a, ts in records:
        try:
            if name == "qcow2_writev_start_req":
                w.ops.append("w")
                w.offsets.append(_int(a["offset"]))
                w.lengths.append(_int(a["bytes"]))
            elif name == "qcow2_add_task" and a.get("action", "").strip('"') == "read":
                w.ops.append("r")
                w.offsets.append(_int(a["offset"]))
                w.lengths.append(_int(a["bytes"]))
            else:
                continue
        except (KeyError, ValueError) as exc:
            raise BadInputError(f"malformed {name} trace record: {exc}") from None
        assert w.timestamps is not None
        w.timestamps.append(ts or 0)
    return w


def trace_records(path: str | Path) -> Iterator[tuple[str, dict[str, str], Optional[int]]]:
    """Records of a log-backend text file or a simpletrace binary file."""
    p = Path(path)
    from qemu_ext.trace import detect_format

    if detect_format(p) != "log":
        return _records_from_simpletrace(p)
    text = p.read_text(errors="replace")
    return _records_from_log(text.splitlines())


def log_records(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, str], Optional[int]]]:
    return _records_from_log(lines)
