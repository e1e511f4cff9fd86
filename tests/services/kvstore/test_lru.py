"""LruLedger: byte accounting, least-recent-first victims, pins, and all-or-nothing room making."""

from __future__ import annotations

from specrelay.services.kvstore.lru import LruLedger


def test_victims_are_least_recent_unpinned_and_only_as_many_as_needed():
    ledger = LruLedger(100)
    for key in (b"a", b"b", b"c", b"d"):
        ledger.add(key, 25)
    ledger.touch(b"a")
    ledger.pin(b"b")
    assert ledger.victims_for(10) == [b"c"]
    assert ledger.victims_for(40) == [b"c", b"d"]
    assert ledger.victims_for(75) == [b"c", b"d", b"a"]
    assert ledger.victims_for(76) is None  # b is pinned: no way to free 76 bytes
    assert ledger.victims_for(101) is None


def test_pins_count_and_replacing_counts_its_own_bytes():
    ledger = LruLedger(50)
    ledger.add(b"a", 30)
    assert ledger.pin(b"a") and ledger.pin(b"a")
    assert ledger.unpin(b"a") and ledger.pins(b"a") == 1
    assert ledger.victims_for(40) is None
    assert ledger.victims_for(50, replacing=b"a") == []
    ledger.add(b"a", 50)
    assert (ledger.used_bytes, ledger.pins(b"a")) == (50, 1)
    assert not ledger.pin(b"missing") and not ledger.unpin(b"missing")
