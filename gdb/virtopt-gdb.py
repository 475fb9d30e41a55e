"""virtopt's gdb pack: ``source /path/to/virtopt/gdb/virtopt-gdb.py`` in any gdb with Python.

It finds the virtopt library (qemu_ext) by itself: the repository this file sits in,
and the virtualenv's site-packages when the pack lives in (or beside) a virtualenv,
since gdb's embedded Python is the system interpreter, not the venv's. When QEMU's
own scripts/qemu-gdb.py can be found (parameter ``virtopt-qemu-gdb-script``,
$VIRTOPT_QEMU_GDB_SCRIPT, or a QEMU source tree above the executable) it is loaded
too, so the ``qemu ...`` commands stay available beside ``virtopt ...``.

    gdb -p $(pidof qemu-system-x86_64) -ex 'source gdb/virtopt-gdb.py' -ex 'virtopt info'
"""

import glob
import os
import sys

import gdb

_HERE = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_HERE)


def _venv_site_packages(base):
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    exact = os.path.join(base, "lib", ver, "site-packages")
    if os.path.isdir(exact):
        return [exact]
    # a venv made by another 3.x: only pure-Python packages will import, better than none
    return sorted(glob.glob(os.path.join(base, "lib", "python3*", "site-packages")))[-1:]


def _setup_path():
    front = [_HERE, _ROOT]
    back = []
    d = _HERE
    for _ in range(6):
        for cand in (d, os.path.join(d, ".venv"), os.path.join(d, "venv")):
            if os.path.isfile(os.path.join(cand, "pyvenv.cfg")):
                back += _venv_site_packages(cand)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    if os.environ.get("VIRTUAL_ENV"):
        back += _venv_site_packages(os.environ["VIRTUAL_ENV"])
    for p in reversed(front):
        if p not in sys.path:
            sys.path.insert(0, p)
    for p in back:
        if p not in sys.path:
            sys.path.append(p)


_setup_path()

try:
    import virtoptgdb
    from virtoptgdb import qemuscripts

    virtoptgdb.load()
    qemuscripts.setup()
except Exception as _exc:  # a broken install: one line, not a traceback
    if os.environ.get("VIRTOPT_DEBUG"):
        raise
    gdb.write(f"virtopt: the gdb pack did not load: {type(_exc).__name__}: {_exc}\n", gdb.STDERR)
