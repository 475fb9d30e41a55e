"""The qcow2 cache of a node in a running QEMU, and its sizing from QEMU's own lookups.

QMP does not report a node's cache options. They come from what the caller knows (the options it
passed to blockdev-add or blockdev-reopen), else from QEMU's command line (-blockdev in JSON or
key=value form, -drive), else the captured trace shows what QEMU used (entry size from the slice
offsets, entries from the highest cache index), else QEMU's defaults are assumed: ``source`` says
which.

``node_caches(session, node)`` gathers them (query-named-block-nodes, query-block,
x-debug-query-block-graph for the file child, /proc/PID/cmdline); ``size_node(info, trace,
target)`` is the one sizing function behind ``/l2cache``, ``/trace capture``'s replay and
``virtopt l2cache tune``: what QEMU did, what the simulator predicts at the current setting (and
whether that equals what QEMU did after the cold start), the curve and the recommendation with its
memory cost and option text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from qemu_ext.errors import BadInputError
from qemu_ext.l2cache import options as O
from qemu_ext.l2cache import sim
from qemu_ext.l2cache import workloads as W

CACHE_KEYS = ("cache-size", "l2-cache-size", "refcount-cache-size", "l2-cache-entry-size", "cache-clean-interval")
_SIZE_KEYS = {"cache-size", "l2-cache-size", "refcount-cache-size", "l2-cache-entry-size"}
_INT_KEYS = {"cache-clean-interval"}
# qcow2 / BlockdevOptionsGeneric booleans (qapi/block-core.json, 7.2 and 10.0)
_BOOL_KEYS = {"read-only", "auto-read-only", "force-share", "lazy-refcounts", "pass-discard-request",
              "pass-discard-snapshot", "pass-discard-other", "direct", "no-flush"}
_ON = {"on", "true", "yes", "1"}


def _typed(key: str, v: Any) -> Any:
    """A -blockdev key=value string as QMP's JSON wants it."""
    if not isinstance(v, str):
        return v
    leaf = key.rsplit(".", 1)[-1]
    if leaf in _SIZE_KEYS:
        return O.parse_size(v)
    if leaf in _INT_KEYS:
        return int(v)
    if leaf in _BOOL_KEYS:
        return v.lower() in _ON
    return v


def _keyval(text: str) -> dict[str, Any]:
    """QEMU's key=value,key.sub=value syntax (",," escapes a comma) into a nested dict."""
    from qemu_ext.host.procfs import split_opts

    out: dict[str, Any] = {}
    for p in split_opts(text):
        if "=" not in p:
            continue
        k, v = p.split("=", 1)
        d = out
        keys = k.split(".")
        for sub in keys[:-1]:
            d = d.setdefault(sub, {}) if isinstance(d.get(sub, {}), dict) else {}
        d[keys[-1]] = _typed(k, v)
    return out


@dataclass
class CmdlineNode:
    """A -blockdev or -drive of QEMU's command line."""

    option: str  # "-blockdev" | "-drive"
    options: dict[str, Any]  # as given (typed for QMP when it was key=value)


def cmdline_nodes(argv: list[str]) -> dict[str, CmdlineNode]:
    """node-name (or -drive id) -> what the command line gave for it."""
    out: dict[str, CmdlineNode] = {}
    for i, a in enumerate(argv[:-1]):
        if a not in ("-drive", "-blockdev", "--drive", "--blockdev"):
            continue
        val = argv[i + 1]
        if val.startswith("{"):
            try:
                obj = json.loads(val)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
        else:
            obj = _keyval(val)
        cn = CmdlineNode("-" + a.lstrip("-"), obj)
        for key in ("node-name", "id"):
            if isinstance(obj.get(key), str):
                out[obj[key]] = cn
    return out


@dataclass
class NodeCache:
    """One qcow2 node of a running QEMU and its cache."""

    node_name: str
    filename: str
    virtual_size: int
    cluster_size: int
    extended_l2: bool
    source: str  # "blockdev-add options" | "command line" | "QEMU defaults (...)"
    options: dict[str, Any]  # the cache options as given
    config: O.CacheConfig
    qemu_version: str
    defined_by: str  # "-blockdev" | "-drive" | "blockdev-add" | "unknown"
    auto_named: bool
    file_child: Optional[str]  # node-name of its file child
    device: Optional[str]  # BlockBackend (drive id / qdev) it is attached to
    node_options: Optional[dict[str, Any]] = None  # every option it was opened with, when known
    full_coverage_size: int = 0

    @property
    def coverage(self) -> int:
        return min(self.virtual_size, self.config.covered_bytes)

    @property
    def full_coverage(self) -> bool:
        return self.config.l2_cache_size >= self.full_coverage_size

    def reopen_refusal(self) -> Optional[str]:
        """Why blockdev-reopen cannot change this node's cache (None: it can)."""
        if self.auto_named:
            return (f"node {self.node_name} has an automatic name (it comes from -drive): QEMU cannot reopen it "
                    "with new options (blockdev-reopen answers \"Cannot change the option 'node-name'\")")
        if self.node_options is None:
            return (f"the options node {self.node_name} was opened with are not known (not on QEMU's command line, "
                    "and QMP does not report them): blockdev-reopen would reset the ones not given to their defaults")
        if self.defined_by == "-drive":
            return (f"node {self.node_name} comes from -drive, whose options mix the drive's and the node's: "
                    "blockdev-reopen would reset some of them")
        if self.file_child is None:
            return f"the file child of node {self.node_name} was not found (x-debug-query-block-graph)"
        return None

    def reopen_options(self, l2_cache_size: int, l2_cache_entry_size: Optional[int]) -> dict[str, Any]:
        """The node's own options with the new cache size: blockdev-reopen resets every option it is
        not given (qmp_blockdev_reopen, 7.2 and 10.0), so they are all passed again; the file child
        by its node-name (a nested definition would open a new one)."""
        assert self.node_options is not None and self.file_child is not None
        opts = {k: v for k, v in self.node_options.items() if k not in ("file", "l2-cache-size", "cache-size")}
        opts["file"] = self.file_child
        opts["l2-cache-size"] = l2_cache_size
        if l2_cache_entry_size is not None:
            opts["l2-cache-entry-size"] = l2_cache_entry_size
        if "cache-size" in self.node_options and "refcount-cache-size" not in opts:
            # cache-size with l2-cache-size: the refcount cache keeps what it had
            opts["refcount-cache-size"] = self.config.refcount_cache_size
        return opts

    def reopen_options_cache_size(self, cache_size: int) -> dict[str, Any]:
        """The node's own options with ``cache-size`` alone for the qcow2 caches: what libvirt passes for
        <metadata_cache><max_size>, so QEMU splits it as it will at the domain's next start
        (read_cache_sizes, 7.2 and 10.0)."""
        assert self.node_options is not None and self.file_child is not None
        opts = {k: v for k, v in self.node_options.items()
                if k not in ("file", "cache-size", "l2-cache-size", "refcount-cache-size", "l2-cache-entry-size")}
        opts["file"] = self.file_child
        opts["cache-size"] = cache_size
        return opts

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "node-name": self.node_name,
            "filename": self.filename,
            "virtual-size": self.virtual_size,
            "cluster-size": self.cluster_size,
            "extended-l2": self.extended_l2,
            "l2-cache-size": c.l2_memory,
            "l2-cache-entry-size": c.l2_cache_entry_size,
            "l2-cache-entries": c.l2_cache_entries,
            "refcount-cache-size": c.refcount_memory,
            "cache-clean-interval": c.cache_clean_interval,
            "settings-source": self.source,
            "options": self.options,
            "coverage": self.coverage,
            "full-coverage-l2-cache-size": self.full_coverage_size,
            "full-coverage": self.full_coverage,
            "defined-by": self.defined_by,
            "reopen": self.reopen_refusal() is None,
        }


def _opt_size(opts: dict[str, Any], key: str) -> Optional[int]:
    return O.parse_size(opts[key]) if opts.get(key) is not None else None


def node_cache(qnode: dict[str, Any], cmd: Optional[CmdlineNode], known: Optional[dict[str, Any]],
               file_child: Optional[str], device: Optional[str], qemu_version: str) -> NodeCache:
    """A NodeCache from QEMU's answers about one node (pure: no I/O)."""
    name = qnode.get("node-name", "")
    img = qnode.get("image", {})
    vsize = int(img.get("virtual-size", 0))
    csize = int(img.get("cluster-size", 65536))
    ext = bool(img.get("format-specific", {}).get("data", {}).get("extended-l2", False))
    node_opts: Optional[dict[str, Any]] = None
    defined_by = "unknown"
    if known is not None:
        node_opts = dict(known)
        opts = {k: v for k, v in known.items() if k in CACHE_KEYS}
        source = "blockdev-add options"
        defined_by = "blockdev-add"
    elif cmd is not None:
        opts = {k: v for k, v in cmd.options.items() if k in CACHE_KEYS}
        source = "command line"
        defined_by = cmd.option
        node_opts = dict(cmd.options) if cmd.option == "-blockdev" else None
    else:
        opts = {}
        source = "QEMU defaults (cache options are not visible over QMP)"
        defined_by = "-drive" if name.startswith("#") else "unknown"
    cfg = O.resolve(
        csize, vsize, ext,
        l2_cache_size=_opt_size(opts, "l2-cache-size"),
        refcount_cache_size=_opt_size(opts, "refcount-cache-size"),
        cache_size=_opt_size(opts, "cache-size"),
        l2_cache_entry_size=_opt_size(opts, "l2-cache-entry-size"),
        cache_clean_interval=int(opts["cache-clean-interval"]) if opts.get("cache-clean-interval") is not None else None,
        qemu_version=qemu_version,
    )
    return NodeCache(name, str(img.get("filename", qnode.get("file", ""))), vsize, csize, ext, source, opts, cfg,
                     qemu_version, defined_by, name.startswith("#"), file_child, device, node_opts,
                     O.full_coverage_size(csize, vsize, ext))


def qemu_series(version: dict[str, Any]) -> str:
    """The option-rule set of a QEMU version (query-version's "qemu"): '7.2' up to 9.x, 'current' from 10."""
    major = int(version.get("major", 7))
    return "current" if major >= 10 else "7.2" if major >= 5 else "4.0" if major == 4 else "3.1"


async def node_caches(s: Any, node: Optional[str] = None,
                      known_options: Optional[dict[str, dict[str, Any]]] = None) -> list[NodeCache]:
    """Every qcow2 node of the QEMU behind session ``s``, or the one called ``node`` by any of its names:
    node-name, drive id, device id or path, and on a libvirt domain libvirt-N-storage and the disk's
    target (``vda``), through qemu_ext.libvirt.nodes.resolve_node."""
    from qemu_ext.l2cache import domain as D
    from qemu_ext.libvirt import nodes as lvnodes
    from qemu_ext.qmp import address as addr
    from qemu_ext.qmp.errors import NoMatchError, QmpCommandError

    nodes = await s.execute("query-named-block-nodes", {"flat": True})
    blocks = await s.execute("query-block")
    drive_of = {b.get("inserted", {}).get("node-name"): b.get("device") or b.get("qdev")
                for b in blocks if b.get("inserted")}
    qcow2 = [n.get("node-name", "") for n in nodes if n.get("drv") == "qcow2"]
    wanted = node
    if node is not None and node not in qcow2 and node not in drive_of.values():
        disks = await D.domain_disks(s)
        try:
            wanted = lvnodes.resolve_node(node, blocks, disks).node_name
        except BadInputError:
            names = [" = ".join(bn.names[:4]) for bn in lvnodes.block_nodes(blocks, disks) if bn.node_name in qcow2]
            names += [n for n in qcow2 if n not in drive_of]
            raise NoMatchError("qcow2 node", node, f"there is: {'; '.join(names)}" if names else
                               "this QEMU has no qcow2 node") from None
    children: dict[str, str] = {}
    try:
        g = await s.execute("x-debug-query-block-graph")
        by_id = {n["id"]: n["name"] for n in g.get("nodes", [])}
        for e in g.get("edges", []):
            if e.get("name") == "file" and e.get("parent") in by_id and e.get("child") in by_id:
                children[by_id[e["parent"]]] = by_id[e["child"]]
    except QmpCommandError:
        pass
    cmdline = cmdline_nodes(addr.proc_cmdline(s.pid)) if s.pid is not None else {}
    version = qemu_series(s.version.get("qemu", {})) if hasattr(s, "version") and isinstance(s.version, dict) else "7.2"
    out = []
    for n in nodes:
        if n.get("drv") != "qcow2":
            continue
        name = n.get("node-name", "")
        drive = drive_of.get(name)
        if wanted is not None and wanted not in (name, drive):
            continue
        known = (known_options or {}).get(name)
        cmd = cmdline.get(name) or (cmdline.get(drive) if drive else None)
        out.append(node_cache(n, cmd, known, children.get(name), drive, version))
    if node is not None and not out:
        raise NoMatchError("qcow2 node", node, f"it names node {wanted}, which is not qcow2" if wanted != node else "")
    return out


# ------------------------------------------------------------------------------------------ sizing
@dataclass
class Sizing:
    """What the lookups QEMU made say about a node's cache (JSON via to_dict)."""

    node: str
    measured: dict[str, Any]
    current: dict[str, Any]
    predicted: Optional[dict[str, Any]]
    prediction_exact: Optional[bool]
    recommendation: Optional[dict[str, Any]]
    full_coverage: dict[str, Any]
    not_evaluated: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    curves: Any = None  # sim.curve's result (with the curve objects) for plots

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "measured": self.measured, "current": self.current, "predicted": self.predicted,
                "prediction-exact": self.prediction_exact, "recommended": self.recommendation,
                "full-coverage": self.full_coverage, "not-evaluated": self.not_evaluated, "notes": self.notes}


def warm_counts(trace: W.SliceTrace, entry: int) -> tuple[int, int]:
    """(re-references, QEMU's misses among them): the lookups after the first of each slice."""
    offs = trace.offsets & ~(entry - 1)
    _u, first = np.unique(offs, return_index=True)
    warm = len(offs) - len(first)
    first_miss = int((~trace.hits[first]).sum())
    return warm, int((~trace.hits).sum()) - first_miss


def size_node(info: NodeCache, trace: W.SliceTrace, target: float = 0.99, seconds: Optional[float] = None,
              max_memory: Optional[int] = None) -> Sizing:
    """The one sizing of a node from the L2 lookups QEMU made (a capture of qcow2_cache_get*).

    measured: QEMU's own lookups, hits and misses (and per second with ``seconds``); predicted:
    the simulator at the node's current setting, from an empty cache. After the cold start (the
    lookups after the first of each slice) a re-reference hits exactly when fewer distinct slices
    came in between than the cache has entries, whatever the cache held before the capture: there
    the prediction must equal QEMU's misses, and ``prediction-exact`` says whether it does (it
    does not when cache-clean-interval fired meanwhile, or the cache is not what ``source`` says).
    """
    notes: list[str] = []
    n = len(trace)
    hits = int(trace.hits.sum())
    measured: dict[str, Any] = {"lookups": n, "hits": hits, "misses": n - hits,
                                "hit-ratio": round(hits / n, 6) if n else None}
    cfg = info.config
    disk = sim.Disk(virtual_size=info.virtual_size, cluster_size=info.cluster_size, extended_l2=info.extended_l2)
    wl = sim.WorkloadSpec(slice_trace=trace, description={"source": f"capture of node {info.node_name}", "lookups": n})
    given = {k: _opt_size(info.options, k) for k in ("l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
                                                      "cache-size")}
    known = info.source != "QEMU defaults (cache options are not visible over QMP)"
    settings = sim.Settings(
        l2_cache_size=given["l2-cache-size"] if known else None,
        l2_cache_entry_size=given["l2-cache-entry-size"] if known else None,
        refcount_cache_size=given["refcount-cache-size"] if known else None,
        cache_size=given["cache-size"] if known else None,
        qemu_version=info.qemu_version)
    if known and not settings.given():
        # the node was opened without cache options: QEMU's defaults are its real setting
        settings = sim.Settings(l2_cache_size=cfg.l2_cache_size, l2_cache_entry_size=cfg.l2_cache_entry_size,
                                qemu_version=info.qemu_version)
    if known:
        trace.cap(cfg.l2_cache_entry_size)  # the options say what the slices are
    if n:
        captured = trace.slice_size
        if known and captured and captured < cfg.l2_cache_entry_size:
            notes.append(f"the trace shows {captured}-byte slices but the options say {cfg.l2_cache_entry_size}-byte "
                         "entries: the lookups come from another node or the options changed")
    predicted = None
    exact = None
    rec = None
    skipped: list[dict[str, Any]] = []
    curves = None
    if n:
        r = sim.recommend(disk, settings, wl, target=target, max_memory=max_memory, node=info.node_name,
                          image=info.filename)
        curves = r["_curves"]
        skipped = r["not-evaluated"]
        cur = r["current"]
        e = cur["l2-cache-entry-size"]
        warm, qemu_warm_misses = warm_counts(trace, e)
        cv = next((c["_curve"] for c in curves["curves"] if c["l2-cache-entry-size"] == e), None)
        if cv is not None:
            sim_misses = cur["misses"]
            sim_warm_misses = sim_misses - cv.distinct
            predicted = {"l2-cache-size": cur["l2-cache-size"], "l2-cache-entry-size": e, "entries": cur["entries"],
                         "lookups": n, "misses": sim_misses, "warm-lookups": warm,
                         "warm-misses": sim_warm_misses, "warm-hit-ratio": cur["warm-hit-ratio"],
                         "measured-warm-misses": qemu_warm_misses,
                         "measured-warm-hit-ratio": round(1 - qemu_warm_misses / warm, 6) if warm else None}
            exact = sim_warm_misses == qemu_warm_misses
            if not exact:
                notes.append(f"the prediction ({sim_warm_misses} misses after the cold start) differs from what QEMU "
                             f"did ({qemu_warm_misses}): cache-clean-interval may have emptied entries, or the cache "
                             "is not what the settings say")
        rec = r["recommended"]
        full = r["full-coverage"]
        if rec is not None:
            rec = {**rec, "target-warm-hit-ratio": target}
    else:
        notes.append("no L2 lookup during the capture: no I/O reached the node, or every request was served "
                     "without the L2 cache")
        full = {"l2-cache-size": info.full_coverage_size}
    if seconds:
        measured["lookups-per-second"] = round(n / seconds, 3)
        measured["misses-per-second"] = round((n - hits) / seconds, 3)
        measured["seconds"] = round(seconds, 6)
    current = {"l2-cache-size": cfg.l2_memory, "l2-cache-entry-size": cfg.l2_cache_entry_size,
               "entries": cfg.l2_cache_entries, "source": info.source}
    if curves is not None and curves["current-setting"].get("source") == "trace":
        cs = curves["cache"]
        current = {"l2-cache-size": cs["l2-memory"], "l2-cache-entry-size": cs["l2-cache-entry-size"],
                   "entries": cs["l2-cache-entries"], "source": "trace",
                   "evidence": curves["current-setting"].get("evidence")}
    return Sizing(info.node_name, measured, current, predicted, exact, rec, full, skipped, notes, curves)


def replay_capture(records: list[Any], info: Optional[NodeCache], notes: list[str]) -> Optional[dict[str, Any]]:
    """/trace capture's L2 part: QEMU's lookups, and the simulator at the node's cache and at full
    coverage (from an empty cache). None when no L2 lookup was captured."""
    try:
        trace = W.SliceTrace.from_lookups(W.parse_cache_trace(W.normalise(records)))
    except BadInputError as exc:
        notes.append(f"the L2-cache simulator could not read the captured events: {exc}")
        return None
    if not len(trace):
        return None
    n = len(trace)
    hits = int(trace.hits.sum())
    out: dict[str, Any] = {"observed": {"lookups": n, "hits": hits, "misses": n - hits,
                                        "hit-ratio": round(hits / n, 6)}}
    if info is None:
        notes.append("several qcow2 nodes: give the node (--node NODE) to replay the lookups in the L2-cache simulator")
        return out
    from qemu_ext.l2cache.model import replay

    full = O.resolve(info.cluster_size, info.virtual_size, info.extended_l2, l2_cache_size=info.full_coverage_size,
                     qemu_version=info.qemu_version)

    def run(entries: int, entry_size: int) -> dict[str, Any]:
        st = replay(trace.offsets & ~(entry_size - 1), entries, entry_size, trace.read_from_disk)
        return {"l2-cache-entries": entries, "l2-cache-entry-size": entry_size, "lookups": st.lookups,
                "hits": st.hits, "misses": st.misses, "hit-ratio": round(st.hit_ratio, 6)}

    why = sim.not_evaluable(sim.WorkloadSpec(slice_trace=trace), info.config.l2_cache_entry_size)
    if why:
        notes.append(f"node {info.node_name}'s cache cannot be replayed: {why}")
        return out
    try:
        current = run(info.config.l2_cache_entries, info.config.l2_cache_entry_size)
        full_cov = run(full.l2_cache_entries, full.l2_cache_entry_size)
    except ValueError as exc:  # lookups that do not fit the node's geometry: events from another node
        notes.append(f"the captured lookups do not fit node {info.node_name}'s cache ({exc}): not simulated")
        return out
    out.update({"node": info.node_name, "simulated-current": current,
                "simulated-full-coverage": {"l2-cache-size": info.full_coverage_size, **full_cov}})
    notes.append("the simulation starts from an empty cache; QEMU's cache may have held tables before the capture")
    return out
