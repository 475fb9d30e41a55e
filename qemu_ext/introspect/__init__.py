"""Backend-neutral views of a QEMU process: written once, read through gdb or drgn.

    from qemu_ext.introspect import drgn_backend, views
    t = drgn_backend.DrgnTarget.attach(pid)            # never stops QEMU
    data = views.run(t, "mtree", flat_view=True)        # the dict `virtopt inspect PID mtree --flat --json` prints

- ``target``: the backend interface (Target: memory, types, symbols, threads) and the neutral
  layer on top (TypeInfo, Value, bounded list walkers, TLS, symbolization).
- ``gdb_backend`` (inside gdb only) and ``drgn_backend`` (PyPI drgn; the live process's memory file, or a core).
- one module per view: info, threads, vcpus, mtree, timers, trace, qcow2, coroutines; ``block``
  reads the block graph; ``layouts`` holds the hand-made layouts of stripped builds and the
  rules that confirm them.
- ``views``: the registry front doors use (requirements, collect, the snapshot key).

Standard library only, except drgn_backend: gdb's own Python imports this package.
"""
