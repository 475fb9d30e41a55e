"""Host-side views of QEMU: /proc and /sys readers, the thread map and pinning, `virtopt doctor`."""
