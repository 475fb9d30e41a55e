"""virtopt's library: everything the CLI, the QMP shell and the gdb commands render."""

__version__ = "0.1.0"
