"""Installing as a user does: a wheel built from the checkout's files, installed into a fresh venv,
works from anywhere (`virtopt --help`, a trace decoded with the packaged C renderer source), `virtopt
gdb --path` names the pack installed in <venv>/share/virtopt/gdb and gdb loads it from there, and
--plot asks for the [plot] extra until matplotlib is there, then writes the PNG.

The fresh venv gets its dependencies from this checkout's venv through a .pth file (the wheel is
installed with --no-deps: no download during the test), matplotlib left out at first; `pip check`
confirms the wheel's Requires-Dist are what it gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, run

PLOT_PACKAGES = ("matplotlib", "mpl_toolkits", "pylab.py")


@dataclass
class Installed:
    venv: Path
    site: Path
    wheel: Path
    env: dict[str, str]
    tmp: Path

    def virtopt(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return run([str(self.venv / "bin" / "virtopt"), *args], check=check, env=self.env, cwd=self.tmp)


def _dev_site() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("install")
    # the files git tracks (as they are in the checkout), so that nothing untracked slips into the wheel
    src = tmp / "src"
    files = run(["git", "-C", str(REPO), "ls-files", "-z"]).stdout.split("\0")
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)])
    wheel = next(dist.glob("virtopt-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = tmp / "deps"  # this venv's packages, except virtopt itself and the [plot] extra
    deps.mkdir()
    for entry in _dev_site().iterdir():
        name = entry.name
        if name.startswith(("virtopt", "__editable__", "_virtualenv")) or name.endswith(".pth") or \
                name.startswith(PLOT_PACKAGES):
            continue
        (deps / name).symlink_to(entry)
    (site / "dev-deps.pth").write_text(f"{deps}\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps", "-q",
         str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTOPT_DEBUG", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return Installed(venv, site, wheel, env, tmp)


def test_the_wheel_runs_from_a_fresh_venv(installed: Installed):
    cp = installed.virtopt("--help", check=True)
    assert "examples:" in cp.stdout and "exit codes:" in cp.stdout
    where = run([str(installed.venv / "bin" / "python"), "-c", "import qemu_ext; print(qemu_ext.__file__)"],
                env=installed.env, cwd=installed.tmp).stdout.strip()
    assert where.startswith(str(installed.site))  # the wheel's copy, not the checkout's
    # the trace decoder with its C renderer source shipped as package data
    log = installed.tmp / "qemu.log"
    log.write_text(run(["qemu-io", "-T", "qcow2_cache_get", "-c", "read 0 64k",
                        str(_image(installed.tmp))]).stderr)
    cp = installed.virtopt("trace", "decode", str(log), check=True)
    assert cp.stdout.count("qcow2_cache_get ") == log.read_text().count("qcow2_cache_get ") > 0
    assert (installed.site / "qemu_ext" / "trace" / "_render.c").is_file()
    # every dependency the wheel declares is there (the [plot] extra is optional)
    chk = run([sys.executable, "-m", "pip", "--python", str(installed.venv / "bin" / "python"), "check"],
              check=False, env=installed.env)
    assert chk.returncode == 0, chk.stdout + chk.stderr


def _image(tmp: Path) -> Path:
    img = tmp / "disk.qcow2"
    if not img.exists():
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"])
        run(["qemu-io", "-c", "write 0 64k", str(img)])
    return img


def test_gdb_path_names_the_installed_pack_and_gdb_loads_it(installed: Installed):
    cp = installed.virtopt("gdb", "--path", check=True)
    path = Path(cp.stdout.strip())
    assert path == installed.venv / "share" / "virtopt" / "gdb" / "virtopt-gdb.py" and path.is_file()
    assert (path.parent / "virtoptgdb" / "command.py").is_file()
    g = run(["gdb", "-nx", "-batch", "-ex", f"source {path}", "-ex", "help virtopt"], check=False,
            env=installed.env, cwd=installed.tmp)
    assert g.returncode == 0 and "Python Exception" not in g.stderr, g.stderr
    for word in ("threads", "vcpus", "mtree", "trace"):
        assert f"virtopt {word}" in g.stdout


def test_plots_need_the_plot_extra_and_work_with_it(installed: Installed):
    png = installed.tmp / "l2.png"
    argv = ["l2cache", "curve", "--virtual-size", "1G", "--count", "500", "--plot", str(png)]
    cp = installed.virtopt(*argv)
    assert cp.returncode == 2 and not png.exists()
    assert cp.stderr == "virtopt: --plot needs matplotlib: pip install 'virtopt[plot]'\n"
    meta = run([str(installed.venv / "bin" / "python"), "-c",
                "from importlib.metadata import metadata as m; print('\\n'.join(m('virtopt').get_all('Requires-Dist')))"],
               env=installed.env).stdout
    assert 'matplotlib>=3.5; extra == "plot"' in meta
    plot = installed.tmp / "plot"  # what pip install 'virtopt[plot]' adds
    plot.mkdir()
    for entry in _dev_site().iterdir():
        if entry.name.startswith(PLOT_PACKAGES):
            (plot / entry.name).symlink_to(entry)
    (installed.site / "plot-extra.pth").write_text(f"{plot}\n")
    cp = installed.virtopt(*argv)
    assert cp.returncode == 0, cp.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
