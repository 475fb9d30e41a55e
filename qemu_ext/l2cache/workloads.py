"""Workloads for the L2-cache simulator: synthetic request streams (generated in chunks, so a long
one never sits in memory), qemu-io command files, and captured QEMU traces (log-backend text or
simpletrace files) at slice level (qcow2_cache_get*) or request level (qcow2_writev_start_req,
qcow2_add_task).

``normalise`` is the one translation of decoded trace records (qemu_ext.trace.TraceRecord, from
a file or from a live capture) into what the simulator reads."""

from __future__ import annotations

import math
import os
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from qemu_ext import errors
from qemu_ext.errors import BadInputError, UsageError
from qemu_ext.l2cache.options import parse_size

PATTERNS = ("sequential", "uniform", "zipf", "hotset", "hotset-scan")
CHUNK_REQUESTS = 1 << 17  # synthetic requests per generated chunk (fixed: the stream depends on it)
MAX_SYNTHETIC_REQUESTS = 10**12
MAX_REQUEST = 1 << 30  # qemu-io's own limit for one request is lower (BDRV_REQUEST_MAX_BYTES)


@dataclass
class Workload:
    """Guest requests as arrays: write flag, offset, length; optional timestamps (ns)."""

    writes: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    timestamps: Optional[np.ndarray] = None
    source: str = ""
    # when the image was opened, on the timestamps' clock (None: at the first request)
    opened_ns: Optional[int] = None

    @classmethod
    def from_lists(cls, ops: list[str], offsets: list[int], lengths: list[int],
                   timestamps: Optional[list[int]] = None, **kw: Any) -> Workload:
        return cls(np.array([o == "w" for o in ops], dtype=bool), np.array(offsets, dtype=np.int64),
                   np.array(lengths, dtype=np.int64),
                   None if timestamps is None else np.array(timestamps, dtype=np.int64), **kw)

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        ops = ["w" if w else "r" for w in self.writes.tolist()]
        return iter(zip(ops, self.offsets.tolist(), self.lengths.tolist()))

    def describe(self) -> dict:
        w = int(np.count_nonzero(self.writes))
        return {
            "source": self.source,
            "requests": len(self),
            "reads": len(self) - w,
            "writes": w,
            "bytes": int(self.lengths.sum()),
        }


# -------------------------------------------------------------------------------- synthetic
@dataclass
class Synthetic:
    """A reproducible request stream over the first `working_set` bytes of the disk.

    sequential: back-to-back requests wrapping around the working set; uniform: random aligned
    offsets; zipf: offsets ranked by a Zipf(s) law over request-sized blocks (block ranks are
    scattered over the working set by a seeded bijection); hotset: `hot_probability` of the
    requests go to a random `hot_fraction` of the blocks, the rest anywhere; hotset-scan: the same
    hot set, the rest a sequential scan of the working set (the pattern that defeats LRU).
    Generated in chunks of CHUNK_REQUESTS: memory does not grow with `count`.
    """

    virtual_size: int
    pattern: str = "uniform"
    count: int = 10000
    request_size: int = 4096
    working_set: Optional[int] = None
    read_ratio: float = 1.0
    seed: int = 0
    zipf_s: float = 1.1
    hot_fraction: float = 0.1
    hot_probability: float = 0.9
    _scan_pos: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        check_synthetic(self)
        ws = self.virtual_size if self.working_set is None else self.working_set
        self.nblocks = ws // self.request_size

    def describe(self) -> dict:
        return {
            "source": f"synthetic {self.pattern}",
            "requests": self.count,
            "pattern": self.pattern,
            "request-size": self.request_size,
            "working-set": self.working_set if self.working_set is not None else self.virtual_size,
            "read-ratio": self.read_ratio,
            "seed": self.seed,
            **({"zipf-s": self.zipf_s} if self.pattern == "zipf" else {}),
            **({"hot-fraction": self.hot_fraction, "hot-probability": self.hot_probability}
               if self.pattern.startswith("hotset") else {}),
        }

    def chunks(self, chunk: int = CHUNK_REQUESTS) -> Iterator[Workload]:
        n = self.nblocks
        rng = np.random.default_rng(self.seed)
        a = int(rng.integers(1, max(2, n)))
        while math.gcd(a, n) != 1:
            a += 1
        b = int(rng.integers(0, n))
        cdf = None
        if self.pattern == "zipf":
            ranks = np.arange(1, min(n, 1 << 22) + 1, dtype=np.float64)
            p = ranks ** (-self.zipf_s)
            cdf = np.cumsum(p)
            cdf /= cdf[-1]
        nhot = max(1, int(n * self.hot_fraction))
        done = 0
        while done < self.count:
            k = min(chunk, self.count - done)
            if self.pattern == "sequential":
                blocks = (np.arange(done, done + k, dtype=np.int64)) % n
            elif self.pattern == "uniform":
                blocks = rng.integers(0, n, size=k, dtype=np.int64)
            elif self.pattern == "zipf":
                assert cdf is not None
                r = np.minimum(np.searchsorted(cdf, rng.random(k), side="right"), len(cdf) - 1)
                blocks = _affine(r.astype(np.int64), a, b, n)
            else:
                hot = rng.random(k) < self.hot_probability
                hb = _affine(rng.integers(0, nhot, size=k, dtype=np.int64), a, b, n)
                if self.pattern == "hotset":
                    other = rng.integers(0, n, size=k, dtype=np.int64)
                else:  # the scan advances by one block per request that is not a hot one
                    other = (np.cumsum(~hot, dtype=np.int64) - 1 + self._scan_pos) % n
                    self._scan_pos += int(np.count_nonzero(~hot))
                blocks = np.where(hot, hb, other)
            writes = np.zeros(k, bool) if self.read_ratio >= 1.0 else rng.random(k) >= self.read_ratio
            yield Workload(writes, blocks * self.request_size, np.full(k, self.request_size, np.int64),
                           source=f"synthetic {self.pattern}")
            done += k

    def workload(self) -> Workload:
        """The whole stream in memory (for the request model)."""
        self._scan_pos = 0
        parts = list(self.chunks())
        self._scan_pos = 0
        if not parts:
            return Workload(source=f"synthetic {self.pattern}")
        return Workload(np.concatenate([p.writes for p in parts]), np.concatenate([p.offsets for p in parts]),
                        np.concatenate([p.lengths for p in parts]), source=f"synthetic {self.pattern}")


def _affine(rank: np.ndarray, a: int, b: int, n: int) -> np.ndarray:
    """(rank * a + b) mod n without overflow (a seeded bijection of [0, n) when gcd(a, n) = 1):
    Horner over the bytes of a keeps every product under 2**62 for n < 2**53."""
    if n < 1 << 31:
        return (rank * a + b) % n
    acc = np.zeros(len(rank), np.int64)
    r = rank % n
    for shift in range((a.bit_length() + 7) // 8 * 8 - 8, -8, -8):
        acc = (acc * 256 + r * ((a >> shift) & 0xFF)) % n
    return (acc + b) % n


RANGES = {
    "count": "1 to 10^12",
    "request-size": "512 to 1G, a multiple of 512, at most the working set",
    "working-set": "one request to the disk size",
    "read-ratio": "0 to 1",
    "zipf-s": "above 0, at most 10",
    "hot-fraction": "above 0, at most 1",
    "seed": "0 or more",
}


def _finite(name: str, v: float) -> None:
    if not math.isfinite(v):
        raise UsageError(f"--{name} must be a finite number ({RANGES[name]}), not {v}")


def check_synthetic(s: Synthetic) -> None:
    """Every parameter in its range, with the range in the message (usage errors)."""
    if s.pattern not in PATTERNS:
        raise UsageError(f"unknown pattern {s.pattern!r}; use one of {', '.join(PATTERNS)}")
    if not 1 <= s.count <= MAX_SYNTHETIC_REQUESTS:
        raise UsageError(f"--count must be {RANGES['count']}, not {s.count}")
    if s.request_size < 512 or s.request_size % 512 or s.request_size > MAX_REQUEST:
        raise UsageError(f"--request-size must be {RANGES['request-size']}, not {s.request_size}")
    if s.working_set is not None and not s.request_size <= s.working_set <= s.virtual_size:
        raise UsageError(f"--working-set must be {RANGES['working-set']} ({s.virtual_size}), not {s.working_set}")
    if s.request_size > (s.working_set if s.working_set is not None else s.virtual_size):
        raise UsageError(f"--request-size must be {RANGES['request-size']}, not {s.request_size}")
    for name, v in (("read-ratio", s.read_ratio), ("zipf-s", s.zipf_s), ("hot-fraction", s.hot_fraction)):
        _finite(name, v)
    if not 0.0 <= s.read_ratio <= 1.0:
        raise UsageError(f"--read-ratio must be {RANGES['read-ratio']}, not {s.read_ratio}")
    if not 0.0 < s.zipf_s <= 10.0:
        raise UsageError(f"--zipf-s must be {RANGES['zipf-s']}, not {s.zipf_s}")
    if not 0.0 < s.hot_fraction <= 1.0:
        raise UsageError(f"--hot-fraction must be {RANGES['hot-fraction']}, not {s.hot_fraction}")
    if not 0.0 <= s.hot_probability <= 1.0:
        raise UsageError(f"the hot probability must be between 0 and 1, not {s.hot_probability}")
    if s.seed < 0:
        raise UsageError(f"--seed must be {RANGES['seed']}, not {s.seed}")


def synthetic(virtual_size: int, **kw: Any) -> Workload:
    """The whole synthetic stream as one Workload (see Synthetic for the parameters)."""
    return Synthetic(virtual_size, **kw).workload()


# -------------------------------------------------------------------------------- input files
def read_text_file(path: str | Path, kind: str) -> str:
    """A text file given by the user, with one wording per condition (qemu_ext.errors): cannot
    open (the OS's reason), not a regular file, empty, binary."""
    p = Path(path)
    _check_regular(p)
    try:
        with open(p, "rb") as f:
            data = f.read(64 << 20)
            more = f.read(1)
    except OSError as exc:
        raise errors.open_error(p, exc) from None
    if b"\0" in data[:65536]:
        raise errors.binary_file(p, kind)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.binary_file(p, kind) from None
    if more:
        raise BadInputError(f"{p}: a {kind} of over 64 MiB is not supported")
    return text


def check_trace_file(path: str | Path) -> None:
    """The checks read_trace does not word as CONTRIBUTING.md says: missing, directory, FIFO or
    device, empty (binary is decided by the format detection: simpletrace files are binary)."""
    p = Path(path)
    _check_regular(p)
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise errors.open_error(p, exc) from None


def _check_regular(p: Path) -> None:
    """Missing, a directory, not a regular file (FIFO, device) or empty: one wording each."""
    try:
        st = os.stat(p)
    except OSError as exc:
        raise errors.open_error(p, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise errors.open_error(p, IsADirectoryError(21, os.strerror(21)))
    if not stat.S_ISREG(st.st_mode):
        raise errors.not_a_file(p)
    if st.st_size == 0:
        raise errors.empty_file(p)


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
    ops: list[str] = []
    offs: list[int] = []
    lens: list[int] = []
    ts: list[int] = []
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
            raise BadInputError(f"{source}:{lineno}: unsupported qemu-io command {cmd[:40]!r}")
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
            raise BadInputError(f"{source}:{lineno}: '{line[:80]}' needs an offset and a length")
        try:
            off = parse_size(args[0])
            n = sum(parse_size(a) for a in args[1:]) if cmd in ("readv", "writev") else parse_size(args[1])
        except BadInputError as exc:
            raise BadInputError(f"{source}:{lineno}: {exc}") from None
        ops.append("r" if cmd in _QIO_READ else "w")
        offs.append(off)
        lens.append(n)
        ts.append(now_ns)
    return Workload.from_lists(ops, offs, lens, ts, source=source, opened_ns=0)


def read_qemu_io_file(path: str | Path) -> Workload:
    text = read_text_file(path, "qemu-io command file")
    w = parse_qemu_io(text.splitlines(), source=str(path))
    if not len(w):
        raise BadInputError(f"{path}: no read or write commands")
    return w


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


# Records (qemu_ext.trace.TraceRecord) key arguments by their declared names, as simpletrace.py
# does: qcow2_cache_get's `c` is the log's `is_l2_cache`, `i` its `index`. Log text parsed
# without an events file keys them by the printed words. The simulator uses the printed words.
_ARG_WORDS = {"c": "is_l2_cache", "i": "index"}
_PROMPT = "qemu-io> "

Record = tuple[str, dict[str, Any], Optional[int]]


def normalise(records: Iterable[Any]) -> Iterator[Record]:
    """The one translation of decoded trace records (file or live capture) for the simulator:
    (event name, {printed argument word: int or str}, timestamp ns or None)."""
    for rec in records:
        name = rec.name
        args = {}
        for k, v in dict(rec.args).items():
            if isinstance(v, bool):
                v = int(v)
            args[_ARG_WORDS.get(k, k)] = v
        yield name, args, getattr(rec, "timestamp_ns", None)


def _strip_prompt(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        # qemu-io's prompt prefixes the first event printed while a command runs
        while line.startswith(_PROMPT):
            line = line[len(_PROMPT) :]
        yield line


def log_records(lines: Iterable[str]) -> Iterator[Record]:
    """Records of log-backend text lines (qemu-io's or QEMU's stderr, a -D file)."""
    from qemu_ext.trace import parse_log_lines

    try:
        yield from normalise(parse_log_lines(_strip_prompt(lines)))
    except ValueError as exc:
        raise BadInputError(f"malformed trace: {exc}") from None


def trace_records(path: str | Path) -> Iterator[Record]:
    """Records of a log-backend text file or a simpletrace binary file."""
    from qemu_ext.trace import detect_format, read_trace

    check_trace_file(path)
    p = Path(path)
    if detect_format(p) != "log":
        return normalise(read_trace(str(p)))
    text = p.read_text(errors="replace")
    return log_records(text.splitlines())


def _int(v: Any) -> int:
    return v if isinstance(v, int) else int(str(v), 0)


def parse_cache_trace(records: Iterable[Record]) -> list[TraceLookup]:
    """Pair qcow2_cache_get with its replace_entry/get_read/get_done per coroutine and cache."""
    out: list[TraceLookup] = []
    pending: dict[tuple[str, str], TraceLookup] = {}
    for name, a, ts in records:
        if not name.startswith("qcow2_cache_get"):
            continue
        try:
            key = (str(a.get("co", "?")), str(a.get("is_l2_cache", "?")))
            if name == "qcow2_cache_get":
                t = TraceLookup(_int(a["is_l2_cache"]) == 1, _int(a["offset"]),
                                _int(a.get("read_from_disk", 1)) == 1, timestamp_ns=ts)
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


@dataclass
class SliceTrace:
    """L2 lookups as QEMU made them (qcow2_cache_get* with is_l2_cache 1), as arrays."""

    offsets: np.ndarray  # int64 slice offsets in the image file
    read_from_disk: np.ndarray  # bool
    hits: np.ndarray  # bool: what QEMU's own cache did
    index: np.ndarray  # int32: the cache entry QEMU used (-1 unknown)
    timestamps: Optional[np.ndarray] = None  # int64 ns
    max_slice: Optional[int] = None  # what the slices can be at most (the cluster size, or the known entry size)

    @classmethod
    def from_lookups(cls, lookups: list[TraceLookup]) -> SliceTrace:
        l2 = [t for t in lookups if t.is_l2]
        ts = [t.timestamp_ns for t in l2]
        return cls(
            np.array([t.offset for t in l2], dtype=np.int64),
            np.array([t.read_from_disk for t in l2], dtype=bool),
            np.array([t.hit for t in l2], dtype=bool),
            np.array([t.index for t in l2], dtype=np.int32),
            np.array(ts, dtype=np.int64) if l2 and all(t is not None for t in ts) else None,
        )

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def slice_size(self) -> int:
        """The L2 slice size QEMU ran with, as far as the offsets show it (the largest power of
        two dividing all of them; a short trace may show a multiple of the real one)."""
        if not len(self.offsets):
            return 0
        g = int(np.bitwise_or.reduce(self.offsets))
        g = g & -g if g else 0
        return min(g, self.max_slice) if self.max_slice else g

    def cap(self, size: int) -> None:
        """The slices are at most `size` bytes (a few L2 tables can share a larger alignment)."""
        self.max_slice = min(self.max_slice, size) if self.max_slice else size

    def cache_evidence(self) -> dict[str, Any]:
        """What the trace says about QEMU's cache: entries used (highest index + 1) and whether
        an entry was ever reused for another slice (then the cache was full: every entry held a
        table, so it has exactly as many entries as QEMU used, as far as the trace shows)."""
        idx = self.index
        known = idx >= 0
        if not known.any():
            return {"entries-used": None, "evicted": False}
        seen: dict[int, int] = {}
        evicted = False
        for i, o, h in zip(idx.tolist(), self.offsets.tolist(), self.hits.tolist()):
            if i < 0:
                continue
            if not h and i in seen and seen[i] != o:
                evicted = True
                break
            seen[i] = o
        return {"entries-used": int(idx[known].max()) + 1, "evicted": evicted}

    def measured(self) -> dict[str, Any]:
        n = len(self)
        hits = int(np.count_nonzero(self.hits))
        return {"lookups": n, "hits": hits, "misses": n - hits, "hit-ratio": round(hits / n, 6) if n else None}


def parse_request_trace(records: Iterable[Record]) -> Workload:
    """Request-level events: qcow2_writev_start_req (a guest write) and qcow2_add_task with
    action 'read' (a piece of a guest read that reads data; pieces that read as zeroes have no
    task, so their lookups are not seen)."""
    ops: list[str] = []
    offs: list[int] = []
    lens: list[int] = []
    ts: list[int] = []
    for name, a, t in records:
        try:
            if name == "qcow2_writev_start_req":
                ops.append("w")
            elif name == "qcow2_add_task" and str(a.get("action", "")).strip('"') == "read":
                ops.append("r")
            else:
                continue
            offs.append(_int(a["offset"]))
            lens.append(_int(a["bytes"]))
        except (KeyError, ValueError) as exc:
            raise BadInputError(f"malformed {name} trace record: {exc}") from None
        ts.append(t or 0)
    return Workload.from_lists(ops, offs, lens, ts, source="request trace")
