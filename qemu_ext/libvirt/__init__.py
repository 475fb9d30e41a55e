"""libvirt-managed QEMUs: the domain behind a name, its monitor through libvirt's own API, its XML.

libvirt holds the only QMP monitor of the QEMUs it starts (passed to QEMU as an fd), so virtopt
reaches a domain's monitor the way ``virsh qemu-monitor-command`` does:

- :mod:`.conn` — the libvirt bindings (Debian's python3-libvirt or PyPI's libvirt-python), addresses
  (``libvirt:NAME``, ``qemu+libvirt:///system?domain=NAME``), opening a domain with one clear error
  per failure;
- :mod:`.domain` — a running domain's QEMU: its PID, vCPU TIDs (libvirt's status XML), libvirt's
  pinning (vcpupin/emulatorpin/iothreadpin as applied), its log file
  (/var/log/libvirt/qemu/NAME.log, where QEMU's stderr and so the log trace backend go) and reading
  new lines from it;
- :mod:`.xml` — the domain XML's <cputune>, <numatune>, <memoryBacking>, <cpu>, disks;
- :mod:`.monitor` — QMP and HMP through virDomainQemuMonitorCommand, events through
  virConnectDomainQemuMonitorEventRegister, and whether libvirt marked the domain tainted
  ("custom-monitor") because of a command; :mod:`.transport` plugs it into qemu_ext.qmp.client as the
  transport of ``libvirt:`` addresses;
- :mod:`.nodes` — node names, drive/device names and ``vda`` targets to the qcow2 format node;
- :mod:`.cache` — L2 advice in libvirt terms: the ``<metadata_cache><max_size>`` that yields a wanted
  l2-cache-size under QEMU's read_cache_sizes() split, with the virsh/virt-xml line;
- :mod:`.daemon` — starting and stopping a private libvirtd/virtlogd for the tests.
"""
