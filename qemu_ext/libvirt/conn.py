"""The libvirt bindings and connections: one clear error for each way opening a domain fails.

The bindings are Debian's python3-libvirt or PyPI's libvirt-python (same modules: ``libvirt``,
``libvirt_qemu``); they are optional: without them every libvirt feature says how to install them.
libvirt prints its errors on stderr by default: the handler is silenced here, errors are raised.
"""

from __future__ import annotations

import threading
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from qemu_ext.errors import BadInputError, NotAvailableError, QemuError

DEFAULT_URI = "qemu:///system"
ADDRESS_FORMS = "libvirt:NAME or qemu+libvirt:///system?domain=NAME"

_lock = threading.Lock()
_event_thread: Optional[threading.Thread] = None


def bindings() -> tuple[Any, Any]:
    """(libvirt, libvirt_qemu) modules; NotAvailableError with how to install them."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError as exc:
        raise NotAvailableError(
            "the libvirt Python bindings are not installed: apt-get install python3-libvirt (Debian; a venv "
            "needs them on its path) or pip install libvirt-python") from exc
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, never printed
    return libvirt, libvirt_qemu


def _run_events(libvirt: Any) -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # an error in one iteration must not end event delivery
            continue


def ensure_event_loop() -> None:
    """libvirt's default event loop, in a daemon thread, registered before any connection is opened
    (monitor events and keepalives need it)."""
    global _event_thread
    libvirt, _ = bindings()
    with _lock:
        if _event_thread is None:
            libvirt.virEventRegisterDefaultImpl()
            _event_thread = threading.Thread(target=_run_events, args=(libvirt,), name="virtopt-libvirt-events",
                                             daemon=True)
            _event_thread.start()


def parse_address(text: str) -> tuple[str, str]:
    """(connection URI, domain name) of ``libvirt:NAME``, ``libvirt:NAME?uri=URI``,
    ``qemu+libvirt:///system?domain=NAME`` or ``qemu+libvirt://HOST/system?domain=NAME``."""
    if text.startswith("qemu+libvirt:"):
        parts = urlsplit("qemu:" + text[len("qemu+libvirt:"):])
        names = parse_qs(parts.query).get("domain")
        if not names or not names[0]:
            raise BadInputError(f"{text}: no domain=NAME in the address (e.g. qemu+libvirt:///system?domain=vm1)",
                                exit_code=2)
        return f"qemu://{parts.netloc}{parts.path}", names[0]
    rest = text[len("libvirt:"):] if text.startswith("libvirt:") else text
    name, _, query = rest.partition("?")
    uri = parse_qs(query).get("uri", [DEFAULT_URI])[0]
    if not name:
        raise BadInputError(f"{text}: no domain name (give {ADDRESS_FORMS})", exit_code=2)
    return uri, name


def open_connection(uri: str = DEFAULT_URI, read_only: bool = False) -> Any:
    libvirt, _ = bindings()
    ensure_event_loop()
    try:
        return libvirt.openReadOnly(uri) if read_only else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        msg = exc.get_error_message() or str(exc)
        hint = " (is libvirtd running?)" if "No such file" in msg or "Connection refused" in msg else ""
        raise QemuError(f"cannot connect to libvirt at {uri}: {msg}{hint}") from None


def open_domain(name: str, uri: str = DEFAULT_URI, running: bool = True, read_only: bool = False) -> tuple[Any, Any]:
    """(connection, domain); QemuError when the domain does not exist or (with ``running``) is not running."""
    libvirt, _ = bindings()
    conn = open_connection(uri, read_only)
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            try:
                names = sorted(d.name() for d in conn.listAllDomains())
            except libvirt.libvirtError:
                names = []
            conn.close()
            have = f"domains: {', '.join(names)}" if names else "it has no domains"
            raise QemuError(f"no libvirt domain {name!r} at {uri} ({have})") from None
        conn.close()
        raise QemuError(f"libvirt domain {name!r}: {exc.get_error_message() or exc}") from None
    if running and not dom.isActive():
        conn.close()
        raise QemuError(f"libvirt domain {name!r} is not running (virsh start {name})")
    return conn, dom


def libvirt_error(exc: BaseException) -> str:
    """The message of a libvirtError (or any exception) on one line."""
    get = getattr(exc, "get_error_message", None)
    text = get() if callable(get) else None
    return (text or str(exc)).splitlines()[0] if (text or str(exc)) else type(exc).__name__
