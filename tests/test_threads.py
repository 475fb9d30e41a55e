"""`virtopt threads` and the thread map on a real QEMU (7.2 and 10.0): roles against
/proc/PID/task/*/comm and QMP's query-cpus-fast / query-iothreads, the VM named by PID, name or QMP
socket, pinning read back from /proc, refusals that change nothing (a process that is not QEMU, PID 1,
a plan naming a missing thread)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from helpers import virtopt

from qemu_ext.host import procfs, roles
from qemu_ext.host.target import qmp_threads
from qemu_ext.host.threads import pin_threads, thread_map

KERNEL_WORKER = "kvm-nx-lpage-re"  # KVM's worker in QEMU's thread group; the kernel may start it late


def comms(pid: int) -> dict[int, str]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(t.name)] = (t / "comm").read_text().strip()
        except OSError:
            pass
    return out


def qemu_named(threads: dict[int, str]) -> dict[int, str]:
    return {tid: n for tid, n in threads.items() if n != KERNEL_WORKER}


def allowed(pid: int, tid: int) -> str:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("no Cpus_allowed_list")


def affinities(pid: int) -> dict[int, str]:
    return {tid: allowed(pid, tid) for tid in comms(pid)}


def taskset(pid: int) -> str:
    """The affinity as util-linux's taskset reads it (sched_getaffinity), not through virtopt."""
    return subprocess.run(["taskset", "-a", "-p", "-c", str(pid)], capture_output=True, text=True,
                          check=True).stdout


def one_line(cp: subprocess.CompletedProcess) -> str:
    assert cp.stderr.count("\n") == 1 and cp.stderr.startswith("virtopt: "), cp.stderr
    assert "Traceback" not in cp.stderr
    return cp.stderr.strip()


@pytest.fixture(scope="module")
def vm2(module_qemu_factory):
    """One QEMU per series with 2 vCPUs and an iothread for the whole module (pinning tests restore
    nothing: each test sets what it needs). No QMP client stays connected: QEMU's QMP serves one client
    at a time. Its name is unique to the series so that `virtopt threads NAME` finds only it."""
    series = module_qemu_factory.build.series.replace(".", "")
    return module_qemu_factory(name=f"vt-threads-{series}-{os.getpid()}", smp=2,
                               extra_args=["-object", "iothread,id=io0"])


def test_roles_match_comm_and_query_cpus_fast(qemu):
    vcpus = qemu.client.cmd("query-cpus-fast")
    threads = thread_map(qemu.pid, vcpus, qemu.client.cmd("query-iothreads"))
    names = comms(qemu.pid)
    by_tid = {t.tid: t for t in threads}
    assert set(qemu_named({t.tid: t.name for t in threads})) == set(qemu_named(names))
    for t in threads:
        assert t.name == names.get(t.tid, KERNEL_WORKER)
    for c in vcpus:
        t = by_tid[c["thread-id"]]
        assert (t.role, t.vcpu_index, t.identified_by) == ("vcpu", c["cpu-index"], "qmp")
        assert t.name in (f"CPU {c['cpu-index']}/KVM", f"CPU {c['cpu-index']}/TCG")
        assert t.label == f"vCPU {c['cpu-index']}"
    assert (by_tid[qemu.pid].role, by_tid[qemu.pid].identified_by) == ("main-loop", "pid")
    assert [t.role for t in threads if t.name == "IO mon_iothread"] == ["monitor-iothread"]
    assert [t.role for t in threads if t.name == "trace-thread"] in ([], ["trace-writer"])
    # the JSON of every thread view (CONTRIBUTING.md "Threads"), role values from the one table
    for t in threads:
        d = t.to_dict()
        assert tuple(d)[:len(roles.JSON_KEYS)] == roles.JSON_KEYS
        assert d["role"] in roles.ROLES and d["label"] == roles.label(t.role, t.vcpu_index, t.iothread_id)
    # without QMP the names alone give the same vCPUs
    by_name = {t.tid: t for t in thread_map(qemu.pid)}
    assert {tid for tid, t in by_name.items() if t.role == "vcpu"} == {c["thread-id"] for c in vcpus}
    assert {t.identified_by for t in by_name.values() if t.role == "vcpu"} == {"name"}
    # the affinity is what the kernel says for each thread
    for t in threads:
        assert set(t.affinity) == os.sched_getaffinity(t.tid)


def test_vm_by_qmp_socket_name_and_pid_give_one_map(vm2):
    sock = str(vm2.qmp_path)
    cp = virtopt("threads", sock, "--output=json")
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["pid"] == vm2.pid  # from SO_PEERCRED on the QMP socket
    names = comms(vm2.pid)
    assert qemu_named({t["tid"]: t["name"] for t in data["threads"]}) == qemu_named(names)
    pid, ans = qmp_threads(sock)
    assert pid == vm2.pid
    got = {t["tid"]: t["vcpu-index"] for t in data["threads"] if t["role"] == "vcpu"}
    assert got == {c["thread-id"]: c["cpu-index"] for c in ans["query-cpus-fast"]}
    assert [(t["tid"], t["iothread-id"]) for t in data["threads"] if t["role"] == "iothread"] == [
        (i["thread-id"], i["id"]) for i in ans["query-iothreads"]]
    # by its -name: the same threads and roles, from the names
    name = vm2.argv[vm2.argv.index("-name") + 1].split(",")[0]
    by_name = json.loads(virtopt("threads", name, "--output=json", check=True).stdout)
    assert by_name["pid"] == vm2.pid and by_name["vm-name"] == name
    assert {(t["tid"], t["role"], t["vcpu-index"], t["iothread-id"]) for t in by_name["threads"]} == {
        (t["tid"], t["role"], t["vcpu-index"], t["iothread-id"]) for t in data["threads"]}
    human = virtopt("threads", str(vm2.pid))
    assert human.returncode == 0
    header = human.stdout.splitlines()[1]
    assert header.split() == " ".join(roles.COLUMNS).split()
    for label in ("vCPU 0", "vCPU 1", "iothread io0", "main loop", "monitor iothread"):
        assert label in human.stdout
    assert f"QEMU pid {vm2.pid} (vm {name})" in human.stdout


def test_pin_changes_the_affinity_read_back_from_proc(vm2):
    _, ans = qmp_threads(str(vm2.qmp_path))
    v = {c["cpu-index"]: c["thread-id"] for c in ans["query-cpus-fast"]}
    io0 = ans["query-iothreads"][0]["thread-id"]
    last = max(os.sched_getaffinity(0))
    first = min(os.sched_getaffinity(0))
    cp = virtopt("threads", "--qmp", str(vm2.qmp_path), "--pin", f"vcpu0={last},vcpu1={first},io={first}",
                 "--output=json")
    assert cp.returncode == 0, cp.stderr
    assert allowed(vm2.pid, v[0]) == str(last)
    assert allowed(vm2.pid, v[1]) == str(first)
    assert allowed(vm2.pid, io0) == str(first)
    pinned = {r["tid"]: r["after"] for r in json.loads(cp.stdout)["pinned"]}
    assert pinned == {v[0]: str(last), v[1]: str(first), io0: str(first)}
    # and back to every CPU through the library
    every = sorted(os.sched_getaffinity(0))
    res = pin_threads(vm2.pid, {"vcpu": every}, ans["query-cpus-fast"], ans["query-iothreads"])
    assert {r.tid for r in res} == set(v.values())
    assert all(os.sched_getaffinity(tid) == set(every) for tid in v.values())


@pytest.mark.parametrize("plan", ["vcpu0=0,vcpu7=0", "vcpu0=0,bogus=1", "vcpu0=0,vcpu1=4096", "vcpu0=0,io:nosuch=0"])
def test_refused_plans_change_nothing(vm2, plan):
    pin_threads(vm2.pid, {"vcpu": sorted(os.sched_getaffinity(0))})
    before = affinities(vm2.pid)
    cp = virtopt("threads", "--qmp", str(vm2.qmp_path), "--pin", plan)
    assert cp.returncode == 1
    one_line(cp)
    assert affinities(vm2.pid) == before


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    p = subprocess.Popen(["sleep", "300"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def test_a_process_that_is_not_qemu_is_refused_and_never_pinned(sleeper):
    """`--pin main=1` on a sleep used to pin it; now: one line, exit 1, taskset shows no change."""
    cpu = min(os.sched_getaffinity(0))
    before = taskset(sleeper.pid)
    exe = os.readlink(f"/proc/{sleeper.pid}/exe")
    for args in (["threads", str(sleeper.pid), "--pin", f"main={cpu}"], ["threads", str(sleeper.pid)],
                 ["threads", str(sleeper.pid), "--pin", f"vcpu={cpu}", "--output=json"],
                 ["doctor", "--pid", str(sleeper.pid), "--interval", "0"]):
        cp = virtopt(*args)
        assert cp.returncode == 1, (args, cp.stdout, cp.stderr)
        assert one_line(cp) == f"virtopt: process {sleeper.pid} is not QEMU (sleep, {exe})"
        assert cp.stdout == ""
    assert taskset(sleeper.pid) == before
    # the library refuses too, whoever calls it
    with pytest.raises(Exception, match="is not QEMU"):
        pin_threads(sleeper.pid, {"main": [cpu]})
    assert taskset(sleeper.pid) == before


def test_pid_1_and_missing_pids():
    init = procfs.process(1)
    for args in (["threads", "1"], ["threads", "1", "--pin", "main=0"], ["doctor", "--pid", "1", "--interval", "0"]):
        cp = virtopt(*args)
        assert cp.returncode == 1 and cp.stdout == ""
        assert one_line(cp) == f"virtopt: process 1 is not QEMU ({init.comm}, {init.exe_text})"
    cp = virtopt("threads", "999999999")
    assert cp.returncode == 1 and one_line(cp) == "virtopt: no process 999999999"
    cp = virtopt("threads")
    assert cp.returncode == 2 and "give the QEMU" in cp.stderr


def test_two_qemus_with_one_name_are_named_by_pid(qemu_factory):
    name = f"vt-twin-{os.getpid()}"
    a, b = qemu_factory(name=name), qemu_factory(name=name)
    cp = virtopt("threads", name)
    assert cp.returncode == 1
    assert one_line(cp) == f"virtopt: 2 QEMUs are named '{name}': PIDs {a.pid}, {b.pid}; give one PID"
    cp = virtopt("doctor", "--vm", name, "--interval", "0")
    assert cp.returncode == 1 and f"PIDs {a.pid}, {b.pid}" in one_line(cp)
    cp = virtopt("threads", name + "-nosuch")
    assert cp.returncode == 1
    assert one_line(cp).startswith(f"virtopt: no QEMU named '{name}-nosuch' and no QMP socket at that path (running: ")


class FakeQmp:
    """A QMP server that is not QEMU (this test process): greets, accepts capabilities, answers queries."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(2)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                self.talk(c)
            except (OSError, ValueError):
                pass  # the client went away (a probe, or done)

    def talk(self, c: socket.socket) -> None:
        with c:
            c.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
                      b'"capabilities": []}}\r\n')
            buf = b""
            while True:
                data = c.recv(4096)
                if not data:
                    return
                buf += data
                while buf.strip():  # qemu.qmp sends objects without a newline: split them as QEMU's JSON lexer does
                    try:
                        req, end = json.JSONDecoder().raw_decode(buf.decode().lstrip())
                    except ValueError:
                        break  # not complete yet
                    buf = buf.decode().lstrip()[end:].encode()
                    cmd = req.get("execute")
                    ret = ([{"cpu-index": 0, "thread-id": os.getpid()}] if cmd == "query-cpus-fast"
                           else [] if cmd == "query-iothreads" else {})
                    reply = {"return": ret, **({"id": req["id"]} if "id" in req else {})}
                    c.sendall(json.dumps(reply).encode() + b"\r\n")

    def close(self) -> None:
        self.sock.close()


def test_a_qmp_server_that_is_not_qemu_is_refused(tmp_path):
    fake = FakeQmp(tmp_path / "fake.qmp")
    try:
        before = taskset(os.getpid())
        cp = virtopt("threads", str(tmp_path / "fake.qmp"), "--pin", "vcpu0=0", timeout=60)
        assert cp.returncode == 1
        exe = os.readlink(f"/proc/{os.getpid()}/exe")
        assert one_line(cp).startswith(f"virtopt: process {os.getpid()} is not QEMU (") and exe in cp.stderr
        assert taskset(os.getpid()) == before
    finally:
        fake.close()


@pytest.fixture
def bad_addresses(tmp_path):
    """Things that are not a QMP socket, each with the one line the QMP client gives for it."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    os.mkfifo(tmp_path / "fifo")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()
    return {
        str(tmp_path / "dir"): "Is a directory",
        str(tmp_path / "file"): "not a socket (a regular file)",
        str(tmp_path / "fifo"): "not a socket (a FIFO)",
        str(tmp_path / "dead.sock"): "Connection refused",
        str(tmp_path / "missing.sock"): "No such file or directory",
        "localhost:1": "Connection refused",  # HOST:PORT, nobody listening
    }


def test_bad_qmp_addresses_give_the_clients_one_line(bad_addresses):
    fifo = next(a for a in bad_addresses if a.endswith("fifo"))
    runs = [["threads", "--qmp", addr] for addr in bad_addresses]
    runs += [["threads", fifo], ["threads", "localhost:1"], ["doctor", "--qmp", fifo, "--interval", "0"]]
    for args in runs:
        addr = args[2] if args[1] == "--qmp" else args[1]
        cp = virtopt(*args, timeout=60)
        assert cp.returncode == 1, (args, cp.stderr)
        line = one_line(cp)
        assert line.startswith(f"virtopt: cannot connect to QMP at {addr}: {bad_addresses[addr]}"), line


def test_busy_monitor_is_reported_not_hung(qemu):
    """The qemu fixture keeps its QMP client connected: a second client gets no greeting."""
    cp = virtopt("threads", "--qmp", str(qemu.qmp_path), "--timeout", "1", timeout=60)
    assert cp.returncode == 1
    assert "another client holds" in one_line(cp)


def test_single_threaded_tcg_thread_is_every_vcpu_not_vcpu_0(qemu_factory):
    """-accel tcg,thread=single runs both vCPUs on one thread, "ALL CPUs/TCG": QMP gives both vCPUs its
    thread-id. That thread is the vCPU role without an index, by name and by QMP alike."""
    qp = qemu_factory(name="st-tcg", smp=2, accel="tcg,thread=single")
    _, ans = qmp_threads(str(qp.qmp_path))  # QMP answers once machine init (vCPU threads) is done
    names = comms(qp.pid)
    assert "ALL CPUs/TCG" in names.values()  # what QEMU calls it (rr_start_vcpu_thread, 7.2 and 10.0)
    tcg = next(tid for tid, n in names.items() if n == "ALL CPUs/TCG")
    assert {c["thread-id"] for c in ans["query-cpus-fast"]} == {tcg} and len(ans["query-cpus-fast"]) == 2
    for cp in (virtopt("threads", str(qp.pid), "--output=json"), virtopt("threads", str(qp.qmp_path), "--output=json")):
        assert cp.returncode == 0, cp.stderr
        t = next(t for t in json.loads(cp.stdout)["threads"] if t["tid"] == tcg)
        assert (t["role"], t["vcpu-index"], t["label"]) == ("vcpu", None, "vCPUs (single-threaded TCG)")
    human = virtopt("threads", str(qp.pid)).stdout
    assert "vCPUs (single-threaded TCG)" in human and "vCPU 0" not in human
    cpu = max(os.sched_getaffinity(0))
    res = pin_threads(qp.pid, {"vcpu": [cpu]}, ans["query-cpus-fast"], ans["query-iothreads"])
    assert [r.tid for r in res] == [tcg] and allowed(qp.pid, tcg) == str(cpu)
    cp = virtopt("threads", str(qp.pid), "--pin", f"vcpu1={cpu}")
    assert cp.returncode == 1 and "vCPUs (single-threaded TCG)" in one_line(cp)


def test_without_thread_names_qmp_still_finds_the_vcpus(qemu_factory):
    """-name ...,debug-threads=off (QEMU's default): every thread is called qemu-system-x86; only QMP's
    thread-ids tell the vCPUs and iothreads apart."""
    qp = qemu_factory(name="nonames", smp=2, extra_args=["-name", "nonames,debug-threads=off",
                                                        "-object", "iothread,id=io1"])
    _, ans = qmp_threads(str(qp.qmp_path))  # QMP answers once machine init (vCPU threads) is done
    names = comms(qp.pid)
    assert len({n for n in names.values() if n != KERNEL_WORKER}) == 1  # QEMU really left its threads unnamed
    plain = thread_map(qp.pid)
    assert {t.role for t in plain if t.name != KERNEL_WORKER} == {"main-loop", "other"}
    human = virtopt("threads", str(qp.pid))
    assert "debug-threads=on" in human.stdout  # the hint
    by_tid = {t.tid: t for t in thread_map(qp.pid, ans["query-cpus-fast"], ans["query-iothreads"])}
    for c in ans["query-cpus-fast"]:
        assert (by_tid[c["thread-id"]].role, by_tid[c["thread-id"]].vcpu_index) == ("vcpu", c["cpu-index"])
    assert by_tid[ans["query-iothreads"][0]["thread-id"]].iothread_id == "io1"
    # pinning by role works through QMP too
    cpu = min(os.sched_getaffinity(0))
    res = pin_threads(qp.pid, {"vcpu1": [cpu]}, ans["query-cpus-fast"], ans["query-iothreads"])
    vcpu1 = next(c["thread-id"] for c in ans["query-cpus-fast"] if c["cpu-index"] == 1)
    assert [r.tid for r in res] == [vcpu1] and allowed(qp.pid, vcpu1) == str(cpu)


def test_vm_name_and_qmp_addresses_from_the_command_line(vm2):
    """procfs reads QEMU's -name and -qmp the way QEMU parses them (QemuOpts: implied key, ",," a comma)."""
    p = procfs.process(vm2.pid)
    assert p.is_qemu and p.argv == vm2.argv
    assert procfs.qemu_qmp_addresses(p.argv, procfs.cwd(vm2.pid)) == [str(vm2.qmp_path)]
    assert procfs.qemu_vm_name(["qemu-system-x86_64", "-name", "guest=a,,b,debug-threads=on"]) == "a,b"
    assert procfs.qemu_vm_name(["qemu-system-x86_64", "-name", "x", "-name", "y,process=z"]) == "y"
    args = ["qemu-system-x86_64", "-chardev", "socket,id=m,path=rel.sock,server=on,wait=off",
            "-mon", "chardev=m,mode=control", "-qmp", "tcp:localhost:4444,server=on"]
    assert procfs.qemu_qmp_addresses(args, "/run/vm") == ["localhost:4444", "/run/vm/rel.sock"]


def test_procfs_process_readers_agree_with_qemu(vm2):
    """The /proc readers the QMP layer and the gdb/inspect views call (qemu_ext.host.procfs), against what
    QEMU itself says: KVM vCPU fds and their kvm_run mappings per vCPU, the vCPU threads sitting in
    ioctl(KVM_RUN), the exe and command line, the QMP socket's owner."""
    pid = vm2.pid
    _, ans = qmp_threads(str(vm2.qmp_path))
    vcpu_tids = {c["cpu-index"]: c["thread-id"] for c in ans["query-cpus-fast"]}
    assert procfs.exe(pid) == os.path.realpath(vm2.binary) and procfs.argv(pid) == vm2.argv
    assert procfs.cwd(pid) == str(vm2.workdir)
    assert procfs.comm(pid, vcpu_tids[1]) == "CPU 1/" + ("KVM" if vm2.accel == "kvm" else "TCG")
    assert procfs.exists_process(pid) and not procfs.exists_process(999999999)
    fds = procfs.fds(pid)
    assert fds[0] == "/dev/null"
    if vm2.accel != "kvm":  # /dev/kvm did not open on this host: QEMU runs TCG, no KVM fds to compare
        assert procfs.kvm_vcpu_fds(pid) == {} and procfs.kvm_run_maps(pid) == {}
        return
    vfds = procfs.kvm_vcpu_fds(pid)
    assert sorted(vfds) == sorted(vcpu_tids) and all(fds[fd].startswith("anon_inode:kvm-vcpu:") for fd in vfds.values())
    runs = procfs.kvm_run_maps(pid)
    assert sorted(runs) == sorted(vcpu_tids)
    maps = {m.start: m for m in procfs.maps(pid)}
    assert all(maps[a].path == f"anon_inode:kvm-vcpu:{i}" and maps[a].offset == 0 for i, a in runs.items())
    # an idle guest's vCPU thread blocks in ioctl(vcpu fd, KVM_RUN) (x86-64: syscall 16, 0xAE80)
    deadline = time.monotonic() + 10
    seen = None
    while time.monotonic() < deadline:
        sc = procfs.task_syscall(pid, vcpu_tids[0])
        if sc is not None and sc.nr == 16 and sc.args[1] == 0xAE80:
            seen = sc
            break
        time.sleep(0.05)
    assert seen is not None and seen.args[0] == vfds[0]
    # the owner of a socket by its inode: QEMU holds its QMP listening socket
    inode = next(int(t[8:-1]) for t in fds.values() if t.startswith("socket:["))
    assert procfs.socket_owner(inode) == pid


def test_qmp_over_tcp_finds_the_qemu_behind_the_port(qemu_factory):
    """HOST:PORT: the PID is the owner of the peer socket (/proc/net/tcp inode, /proc/*/fd)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # QEMU takes the port a moment later
    qp = qemu_factory(name="vt-tcp", extra_args=["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"])
    deadline = time.monotonic() + 20
    while True:  # wait for QEMU's TCP listener (vm.start_qemu waits for unix sockets only)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, qp.stderr_text()
            time.sleep(0.1)
    time.sleep(0.2)  # QEMU serves one client: let it see the probe go
    cp = virtopt("threads", f"127.0.0.1:{port}", "--output=json", timeout=60)
    assert cp.returncode == 0, cp.stderr
    data = json.loads(cp.stdout)
    assert data["pid"] == qp.pid and [t["vcpu-index"] for t in data["threads"] if t["role"] == "vcpu"] == [0]
    assert procfs.qemu_qmp_addresses(procfs.argv(qp.pid)) == [str(qp.qmp_path), f"127.0.0.1:{port}"]
