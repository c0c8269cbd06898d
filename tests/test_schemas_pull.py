"""Unit tests for schemas/pull.py: the sans-I/O PullPlan, driven with an injected clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.pull import PullPlan


def hashes(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def sent(batches: list[tuple[str, list[str]]]) -> list[str]:
    return [h for _, hs in batches for h in hs]


# -- construction, done, received --------------------------------------------------------------------


def test_rejects_non_positive_window_or_batch() -> None:
    with pytest.raises(ValueError):
        PullPlan(hashes(1), ["a"], window=0)
    with pytest.raises(ValueError):
        PullPlan(hashes(1), ["a"], batch=0)


def test_empty_plan_is_done() -> None:
    plan = PullPlan([], ["a"])
    assert plan.done
    assert plan.poll(0.0) == []


def test_duplicate_hashes_are_wanted_once() -> None:
    h = hashes(2)
    plan = PullPlan([h[0], h[1], h[0]], ["a"])
    assert plan.remaining == 2
    assert sent(plan.poll(0.0)) == [h[0], h[1]]


def test_received_removes_and_reports_unwanted() -> None:
    h = hashes(3)
    plan = PullPlan(h, ["a"])
    plan.poll(0.0)
    assert plan.wants(h[0])
    assert plan.received(h[0]) is True
    assert not plan.wants(h[0])
    assert plan.received(h[0]) is False  # duplicate
    assert plan.received("f" * 64) is False  # unsolicited
    assert plan.remaining == 2
    assert plan.in_flight() == 2


def test_done_after_everything_arrived() -> None:
    h = hashes(3)
    plan = PullPlan(h, ["a"])
    plan.poll(0.0)
    for d in h:
        assert not plan.done
        plan.received(d)
    assert plan.done
    assert plan.remaining == 0
    assert plan.poll(1.0) == []


# -- window and batches ------------------------------------------------------------------------------


def test_window_is_never_exceeded() -> None:
    h = hashes(100)
    plan = PullPlan(h, ["a", "b"], window=10, batch=3)
    first = sent(plan.poll(0.0))
    assert len(first) == 10
    assert plan.in_flight() == 10
    assert plan.poll(0.5) == []  # window full, nothing expired
    for d in first[:4]:
        plan.received(d)
    second = sent(plan.poll(1.0))
    assert len(second) == 4
    assert not set(first) & set(second)
    assert plan.in_flight() == 10


def test_batches_respect_batch_size() -> None:
    plan = PullPlan(hashes(50), ["a"], window=20, batch=8)
    out = plan.poll(0.0)
    assert [len(hs) for _, hs in out] == [8, 8, 4]
    assert {p for p, _ in out} == {"a"}
    assert plan.requests_sent == 3


def test_first_request_goes_to_the_first_provider() -> None:
    plan = PullPlan(hashes(3), ["hub", "dev:bob"])
    assert [p for p, _ in plan.poll(0.0)] == ["hub"]


# -- timeouts and missing ------------------------------------------------------------------------------


def test_timeout_moves_a_hash_to_the_next_provider() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b", "c"], timeout=3.0, retry_after=2.0)
    assert plan.poll(0.0) == [("a", [h])]
    assert plan.poll(2.99) == []
    assert plan.timeouts == 0
    assert plan.poll(3.0) == [("b", [h])]
    assert plan.timeouts == 1
    assert plan.poll(6.0) == [("c", [h])]
    assert plan.timeouts == 2


def test_missing_moves_a_hash_to_the_next_provider() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"])
    plan.poll(0.0)
    plan.missing(h, "a", 0.1)
    assert plan.in_flight() == 0
    assert plan.poll(0.1) == [("b", [h])]


def test_missing_current_moves_a_hash_to_the_next_provider() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"])
    plan.poll(0.0)
    plan.missing_current(h, 0.1)
    assert plan.poll(0.1) == [("b", [h])]


def test_missing_current_when_not_in_flight_is_ignored() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"])
    plan.missing_current(h, 0.0)
    assert plan.poll(0.0) == [("a", [h])]


def test_late_missing_from_an_earlier_provider_keeps_the_current_request() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b", "c"], timeout=3.0)
    plan.poll(0.0)
    plan.poll(3.0)  # timed out at a, now asked of b
    plan.missing(h, "a", 3.1)  # a's late answer
    assert plan.in_flight() == 1
    assert plan.poll(3.2) == []


def test_missing_for_unknown_or_received_hash_is_ignored() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a"])
    plan.poll(0.0)
    plan.received(h)
    plan.missing(h, "a", 0.0)
    plan.missing_current(h, 0.0)
    plan.missing("e" * 64, "a", 0.0)
    assert plan.done


def test_all_providers_failed_backs_off_then_retries_from_the_first() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"], timeout=3.0, retry_after=2.0)
    plan.poll(0.0)
    plan.missing_current(h, 1.0)  # a
    assert plan.poll(1.0) == [("b", [h])]
    plan.missing_current(h, 1.5)  # b: every provider failed
    assert plan.poll(1.5) == []
    assert plan.poll(3.49) == []
    assert plan.next_deadline(1.5) == pytest.approx(3.5)
    assert plan.poll(3.5) == [("a", [h])]
    plan.missing_current(h, 3.6)
    assert plan.poll(3.6) == [("b", [h])]


def test_all_providers_timed_out_backs_off_then_retries() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"], timeout=3.0, retry_after=2.0)
    plan.poll(0.0)
    plan.poll(3.0)  # a timed out -> b
    assert plan.poll(6.0) == []  # b timed out too: back off until 8.0
    assert plan.timeouts == 2
    assert plan.poll(7.9) == []
    assert plan.poll(8.0) == [("a", [h])]


def test_a_late_blob_is_accepted_after_a_timeout() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"], timeout=3.0)
    plan.poll(0.0)
    plan.poll(3.0)
    assert plan.received(h) is True
    assert plan.done


# -- providers ---------------------------------------------------------------------------------------


def test_no_providers_sends_nothing_until_set() -> None:
    h = hashes(2)
    plan = PullPlan(h, [])
    assert plan.poll(0.0) == []
    plan.set_providers(["hub"])
    assert plan.poll(0.1) == [("hub", h)]


def test_set_providers_changes_who_is_asked_next() -> None:
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"])
    plan.poll(0.0)
    plan.missing_current(h, 0.0)
    plan.set_providers(["a", "c"])
    assert plan.poll(0.0) == [("c", [h])]


def test_set_providers_copies_the_list() -> None:
    providers = ["a"]
    plan = PullPlan(hashes(1), providers)
    providers.append("b")
    assert plan.providers == ["a"]
    new = ["c"]
    plan.set_providers(new)
    new.clear()
    assert plan.providers == ["c"]


def test_set_providers_dropping_the_untried_provider_still_retries() -> None:
    """a said "missing", then b (untried) went away: a must be retried after the back-off, not never."""
    (h,) = hashes(1)
    plan = PullPlan([h], ["a", "b"], timeout=3.0, retry_after=2.0)
    plan.poll(0.0)
    plan.missing_current(h, 0.0)
    plan.set_providers(["a"])
    asked = [(t, b) for t in (0.0, 1.0, 2.0, 2.5) for b in plan.poll(t)]
    assert asked == [(2.0, ("a", [h]))]  # after one retry_after, from the first provider


# -- next_deadline -----------------------------------------------------------------------------------


def test_next_deadline_is_the_request_deadline() -> None:
    h = hashes(2)
    plan = PullPlan(h, ["a"], timeout=3.0)
    plan.poll(1.0)
    assert plan.next_deadline(1.5) == pytest.approx(4.0)


def test_next_deadline_is_now_when_something_can_be_sent() -> None:
    plan = PullPlan(hashes(2), ["a"], window=8)
    assert plan.next_deadline(5.0) == 5.0


def test_next_deadline_when_done() -> None:
    plan = PullPlan([], ["a"], timeout=3.0)
    assert plan.next_deadline(5.0) == pytest.approx(8.0)


def test_next_deadline_with_a_full_window_is_the_earliest_request_deadline() -> None:
    """While the window is full poll() has nothing to do until a request expires: do not spin."""
    plan = PullPlan(hashes(10), ["a"], window=2, timeout=3.0)
    plan.poll(0.0)
    plan.poll(1.0)  # nothing to send: window full
    assert plan.next_deadline(1.0) == pytest.approx(3.0)


# -- property: random interleavings ------------------------------------------------------------------

PROVIDERS = ["hub", "dev:a", "dev:b"]

_op = st.one_of(
    st.tuples(st.just("poll")),
    st.tuples(st.just("answer"), st.integers(0, 10_000)),
    st.tuples(st.just("drop"), st.integers(0, 10_000)),
    st.tuples(st.just("advance"), st.floats(0.0, 5.0)),
    st.tuples(st.just("unsolicited"), st.integers(0, 10_000)),
    st.tuples(st.just("providers"), st.sets(st.sampled_from(PROVIDERS), min_size=0, max_size=3)),
)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_interleavings_respect_the_window_and_finish(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 30), label="hashes")
    window = data.draw(st.integers(1, 12), label="window")
    batch = data.draw(st.integers(1, 6), label="batch")
    providers = PROVIDERS[: data.draw(st.integers(1, 3), label="providers")]
    wanted = hashes(n)
    holds = {h: data.draw(st.sets(st.sampled_from(providers), min_size=1), label="holders") for h in wanted}
    plan = PullPlan(wanted, providers, window=window, batch=batch, timeout=3.0, retry_after=2.0)
    now = 0.0
    outstanding: list[tuple[str, str]] = []
    got: set[str] = set()

    def do_poll() -> None:
        out = plan.poll(now)
        digests = sent(out)
        assert len(digests) == len(set(digests)), "a hash was requested twice in one poll"
        assert len(digests) <= window
        for provider, hs in out:
            assert 1 <= len(hs) <= batch
            assert provider in plan.providers
            assert all(plan.wants(d) for d in hs)
            outstanding.extend((provider, d) for d in hs)
        assert plan.in_flight() <= window

    def answer(provider: str, d: str) -> None:
        if provider in holds[d]:
            if plan.received(d):
                assert d not in got
                got.add(d)
        else:
            plan.missing(d, provider, now)

    for op in data.draw(st.lists(_op, max_size=60), label="ops"):
        kind = op[0]
        if kind == "poll":
            do_poll()
        elif kind == "answer" and outstanding:
            answer(*outstanding.pop(op[1] % len(outstanding)))
        elif kind == "drop" and outstanding:
            outstanding.pop(op[1] % len(outstanding))
        elif kind == "advance":
            now += op[1]
        elif kind == "unsolicited":
            assert plan.received(f"{10_000 + op[1]:064x}") is False
        elif kind == "providers":
            plan.set_providers([p for p in PROVIDERS if p in op[1]])
        assert plan.in_flight() <= window

    # Providers now answer every request promptly; late answers to old requests are lost.
    plan.set_providers(providers)
    outstanding.clear()
    for _ in range(2000):
        if plan.done:
            break
        do_poll()
        while outstanding:
            answer(*outstanding.pop(0))
        now = max(plan.next_deadline(now), now + 0.25)
    assert plan.done
    assert got == set(wanted)
