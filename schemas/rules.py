"""Pure version rules on schema types: which head wins, and what an agent does with a head it sees."""

from __future__ import annotations

import enum

from schemas.messages import Head, Presence, PresenceState


def head_key(head: Head) -> tuple[int, str]:
    """Total order on heads: higher version wins; equal versions tie-break on the content hash."""
    return (head.version, head.hash)


def supersedes(candidate: Head, current: Head | None) -> bool:
    return current is None or head_key(candidate) > head_key(current)


def next_version(*known: Head | None) -> int:
    return max((h.version for h in known if h is not None), default=0) + 1


class RemoteAction(enum.Enum):
    IGNORE = "ignore"
    APPLY = "apply"
    REASSERT = "reassert"
    """Our own head beats the one the broker now retains: publish ours again."""


def on_remote_head(remote: Head, known: Head | None, me: str) -> RemoteAction:
    """What a running agent does with a head that arrived while it knows ``known``."""
    if known is not None and remote.hash == known.hash and remote.deleted == known.deleted:
        return RemoteAction.IGNORE
    if supersedes(remote, known):
        return RemoteAction.APPLY
    if known is not None and known.author == me and known.version >= remote.version:
        return RemoteAction.REASSERT
    return RemoteAction.IGNORE


class Startup(enum.Enum):
    NOTHING = "nothing"
    IN_SYNC = "in_sync"
    APPLY_REMOTE = "apply_remote"
    PUBLISH_LOCAL = "publish_local"
    CONFLICT = "conflict"
    """Both sides changed (or first run with different content): keep local as a conflict copy, apply."""


def at_startup(local_hash: str | None, synced: Head | None, remote: Head | None) -> Startup:
    """Reconcile one file at start-up from the local content, the last synced head and the retained head."""
    if remote is None or remote.deleted:
        return Startup.NOTHING if local_hash is None else Startup.PUBLISH_LOCAL
    if local_hash is None:
        return Startup.APPLY_REMOTE
    if local_hash == remote.hash:
        return Startup.IN_SYNC
    if synced is None:
        return Startup.CONFLICT
    if synced.hash == local_hash:
        # Unchanged here: take a newer head; re-publish ours if the broker lost it for an older one.
        return Startup.APPLY_REMOTE if supersedes(remote, synced) else Startup.PUBLISH_LOCAL
    if remote.hash == synced.hash:
        return Startup.PUBLISH_LOCAL
    return Startup.CONFLICT


def presence_is_current(new: Presence, current: Presence | None) -> bool:
    """A presence message replaces the known one unless it is from an older epoch.

    At the same epoch "offline" wins (the Last Will or clean stop of that very session).
    """
    if current is None or new.epoch > current.epoch:
        return True
    if new.epoch < current.epoch:
        return False
    return new.state is PresenceState.OFFLINE or current.state is PresenceState.ONLINE
