"""A sans-I/O scheduler for pulling blobs by hash: a bounded window of requests across providers.

The caller owns the clock and the sockets.  It asks :meth:`PullPlan.poll` which requests to send
now, reports each blob that arrived or was missing, and stops when :attr:`PullPlan.done`.
A request that times out, or that its provider answers "missing", moves to the next provider;
when every provider has failed a hash, it waits ``retry_after`` and starts the round again.
Nothing is ever assumed delivered because a broker acknowledged it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class _Want:
    tried: set[str] = field(default_factory=set)
    provider: str | None = None
    deadline: float = 0.0
    not_before: float = 0.0


class PullPlan:
    def __init__(
        self,
        hashes: Iterable[str],
        providers: list[str],
        *,
        window: int = 64,
        batch: int = 16,
        timeout: float = 3.0,
        retry_after: float = 2.0,
    ) -> None:
        if window < 1 or batch < 1:
            raise ValueError("window and batch must be positive")
        self._want: dict[str, _Want] = {h: _Want() for h in dict.fromkeys(hashes)}
        self.providers = list(providers)
        self.window = window
        self.batch = batch
        self.timeout = timeout
        self.retry_after = retry_after
        self.requests_sent = 0
        self.timeouts = 0

    @property
    def done(self) -> bool:
        return not self._want

    @property
    def remaining(self) -> int:
        return len(self._want)

    def in_flight(self) -> int:
        return sum(1 for w in self._want.values() if w.provider is not None)

    def wants(self, digest: str) -> bool:
        return digest in self._want

    def set_providers(self, providers: list[str]) -> None:
        self.providers = list(providers)

    def received(self, digest: str) -> bool:
        """A verified blob arrived; return False when it was not wanted (duplicate or unsolicited)."""
        return self._want.pop(digest, None) is not None

    def missing(self, digest: str, provider: str, now: float) -> None:
        want = self._want.get(digest)
        if want is None:
            return
        want.tried.add(provider)
        if want.provider == provider:
            want.provider = None
        self._maybe_backoff(want, now)

    def missing_current(self, digest: str, now: float) -> None:
        """The provider currently asked for ``digest`` answered that it does not hold it."""
        want = self._want.get(digest)
        if want is not None and want.provider is not None:
            self.missing(digest, want.provider, now)

    def _maybe_backoff(self, want: _Want, now: float) -> None:
        if self.providers and all(p in want.tried for p in self.providers):
            want.tried.clear()
            want.not_before = now + self.retry_after

    def poll(self, now: float) -> list[tuple[str, list[str]]]:
        """Expire late requests, then fill the window; returns (provider, hashes) batches to send."""
        for want in self._want.values():
            if want.provider is not None and now >= want.deadline:
                self.timeouts += 1
                want.tried.add(want.provider)
                want.provider = None
                self._maybe_backoff(want, now)
        free = self.window - self.in_flight()
        batches: dict[str, list[str]] = {}
        if free <= 0 or not self.providers:
            return []
        for digest, want in self._want.items():
            if free <= 0:
                break
            if want.provider is not None or want.not_before > now:
                continue
            provider = next((p for p in self.providers if p not in want.tried), None)
            if provider is None:
                # Every provider still listed has failed it (the list may have shrunk): back off.
                self._maybe_backoff(want, now)
                continue
            want.provider = provider
            want.deadline = now + self.timeout
            batches.setdefault(provider, []).append(digest)
            free -= 1
        out: list[tuple[str, list[str]]] = []
        for provider, digests in batches.items():
            for i in range(0, len(digests), self.batch):
                out.append((provider, digests[i : i + self.batch]))
        self.requests_sent += len(out)
        return out

    def next_deadline(self, now: float) -> float:
        """When :meth:`poll` next has something to do if nothing arrives (for the caller's sleep)."""
        if not self.providers:
            return now + self.retry_after
        if self.in_flight() >= self.window:  # nothing new can go out before a request ends
            times = [w.deadline for w in self._want.values() if w.provider is not None]
        else:
            times = [w.deadline if w.provider is not None else max(w.not_before, now) for w in self._want.values()]
        return min(times, default=now + self.timeout)
