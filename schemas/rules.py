"""Pure version rules on schema types: which head wins, and what an agent does with a head it sees."""

from __future__ import annotations

import enum

from schemas.messages import Head, Presence, PresenceState


class Relation(enum.Enum):
    """How one head stands to another in the version ancestry."""

    SAME = "same"
    """The same content (whatever the history that led to it)."""
    DESCENDS = "descends"
    """It was made from (a descendant of) the other: a fast-forward."""
    PRECEDES = "precedes"
    """The other was made from it: it is older."""
    CONCURRENT = "concurrent"
    """Neither was made from the other: two edits of one version, a conflict."""


def relation(a: Head, b: Head) -> Relation:
    """How ``a`` relates to ``b``, decided by the version vectors.

    Each head's vector names, per device, the version of that device's last edit in its lineage;
    ``a`` descends from ``b`` when its vector is at least ``b``'s everywhere.  Heads without a
    vector (older agents) fall back on the parent link, then on the version number.
    """
    if a.hash == b.hash and a.deleted == b.deleted:
        return Relation.SAME
    if a.vector and b.vector:
        a_ge = all(a.vector.get(d, 0) >= n for d, n in b.vector.items())
        b_ge = all(b.vector.get(d, 0) >= n for d, n in a.vector.items())
        if a_ge != b_ge:
            return Relation.DESCENDS if a_ge else Relation.PRECEDES
        return Relation.CONCURRENT  # (equal vectors with different content cannot be ordered either)
    if a.parent is not None and a.parent == b.hash:
        return Relation.DESCENDS
    if b.parent is not None and b.parent == a.hash:
        return Relation.PRECEDES
    if a.version != b.version:
        return Relation.DESCENDS if a.version > b.version else Relation.PRECEDES
    return Relation.CONCURRENT


def merge_same(known: Head, other: Head) -> Head:
    """``known`` with ``other``'s history folded in, for two heads with the same content.

    Two devices that publish the same content at once (both reverting, both pulling the same
    export) make two lineages that meet in content; an edit made after seeing both must descend
    from both, or the other device would take it for a concurrent edit.
    """
    if not other.vector or known.vector == other.vector:
        return known
    merged = dict(known.vector)
    for d, n in other.vector.items():
        merged[d] = max(merged.get(d, 0), n)
    return known.model_copy(update={"vector": merged})


def head_key(head: Head) -> tuple[int, bool, str]:
    """Total order on heads, the deterministic winner rule every device and the coordinator apply:
    the higher version wins; at equal versions content beats a deletion, then the higher hash wins.

    A descendant always has a higher version than its ancestors (a new version is numbered one
    above every version its author knows), so the order never puts an ancestor above a descendant.
    """
    return (head.version, not head.deleted, head.hash)


def supersedes(candidate: Head, current: Head | None) -> bool:
    return current is None or head_key(candidate) > head_key(current)


def winner(a: Head, b: Head) -> Head:
    return a if head_key(a) >= head_key(b) else b


def next_version(*known: Head | None) -> int:
    return max((h.version for h in known if h is not None), default=0) + 1


def next_vector(base: Head | None, device: str, version: int) -> dict[str, int]:
    """The vector of a new version ``version`` that ``device`` made from ``base``."""
    vector = dict(base.vector) if base is not None else {}
    vector[device] = version
    return vector


class RemoteAction(enum.Enum):
    IGNORE = "ignore"
    APPLY = "apply"
    APPLY_KEEP_LOCAL = "apply_keep_local"
    """Our own version lost to a concurrent one: keep ours as a conflict copy, then apply."""
    REASSERT = "reassert"
    """Our own head beats the one the broker now retains: publish ours again."""


def on_remote_head(remote: Head, known: Head | None, me: str) -> RemoteAction:
    """What a running agent does with a head that arrived while it knows ``known``."""
    if known is None:
        return RemoteAction.APPLY
    rel = relation(remote, known)
    if rel is Relation.SAME:
        return RemoteAction.IGNORE
    if supersedes(remote, known):
        if rel is Relation.CONCURRENT and known.author == me:
            return RemoteAction.APPLY_KEEP_LOCAL
        return RemoteAction.APPLY
    # Ours is newer, or won a concurrent edit: its author makes sure the broker holds it again.
    return RemoteAction.REASSERT if known.author == me else RemoteAction.IGNORE


class Startup(enum.Enum):
    NOTHING = "nothing"
    IN_SYNC = "in_sync"
    APPLY_REMOTE = "apply_remote"
    PUBLISH_LOCAL = "publish_local"
    CONFLICT = "conflict"
    """Both sides changed (or first run with different content): keep local as a conflict copy, apply."""


def content_of(head: Head | None) -> str | None:
    """What a head says the path holds: the content hash, or None for a deletion (or no head)."""
    return None if head is None or head.deleted else head.hash


def at_startup(local_hash: str | None, synced: Head | None, remote: Head | None, me: str = "") -> Startup:
    """Reconcile one path at start-up (and after each reconnect) from the local content (None:
    no file), the last synced head and the retained head.  A deletion is a head like any other.

    An edit made here while offline that meets a newer published version is a conflict: the
    published version wins (others may already hold or build on it) and the local edit is kept as
    a conflict copy.  Our own published version that lost to a concurrent one meanwhile, likewise.
    An edit beats a deletion, on either side.
    """
    if remote is None:
        return Startup.NOTHING if local_hash is None else Startup.PUBLISH_LOCAL
    theirs = content_of(remote)
    if synced is not None and supersedes(synced, remote):
        # The broker holds an older (or losing) head than the one we synced: ours stands, and a
        # local change made on top of it (a deletion included) is a new version.
        return Startup.PUBLISH_LOCAL
    if local_hash == theirs:
        return Startup.IN_SYNC
    if synced is None:
        if local_hash is None:
            return Startup.APPLY_REMOTE
        return Startup.PUBLISH_LOCAL if remote.deleted else Startup.CONFLICT
    ours = content_of(synced)
    if local_hash == ours:
        # Unchanged here since the last sync: take the newer head, keeping ours if it lost a race.
        lost = local_hash is not None and synced.author == me and relation(remote, synced) is Relation.CONCURRENT
        return Startup.CONFLICT if lost else Startup.APPLY_REMOTE
    if theirs == ours:
        return Startup.PUBLISH_LOCAL  # changed (or deleted) here only
    if local_hash is None:
        return Startup.APPLY_REMOTE  # deleted here, edited there: the edit wins
    if remote.deleted:
        return Startup.PUBLISH_LOCAL  # edited here, deleted there: the edit wins
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
