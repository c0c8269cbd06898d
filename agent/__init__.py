"""The device side of Atrius: config, watcher, chunker, transfer, apply, snapshots and the agent CLI."""

__version__ = "0.1.0"
