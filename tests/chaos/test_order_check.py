"""The chaos tests' per-key order check fails when order is broken (a check that cannot fail proves nothing)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos._kafka import Record, assert_per_key_order

KEYS = 3


def batch(b: int) -> list[dict[str, Any]]:
    return [{"id": f"e-{b}-{i}", "partitionkey": f"k{i % KEYS}"} for i in range(6)]


def records(order: list[tuple[int, int]]) -> list[Record]:
    """Records of (batch, index) in this order, each key on its own partition, offsets as they arrive."""
    offsets: dict[int, int] = {}
    out = []
    for b, i in order:
        partition = i % KEYS
        offset = offsets[partition] = offsets.get(partition, -1) + 1
        out.append(Record(partition, offset, f"k{partition}".encode(), {"ce_id": f"e-{b}-{i}"}, b""))
    return out


IN_ORDER = [(b, i) for b in (0, 1) for i in range(6)]
ONE_AFTER_THE_OTHER = {0: (1, 2), 1: (3, 4)}  # batch 1 first sent after batch 0's 202


def test_events_in_the_order_sent_pass() -> None:
    assert_per_key_order(records(IN_ORDER), ONE_AFTER_THE_OTHER, batch)


def test_a_redelivery_after_the_first_records_does_not_count() -> None:
    assert_per_key_order(records([*IN_ORDER, (0, 0), (0, 3)]), ONE_AFTER_THE_OTHER, batch)


def test_a_later_batch_overtaking_an_answered_one_fails() -> None:
    swapped = [(b, i) for b in (1, 0) for i in range(6)]
    with pytest.raises(AssertionError, match=r"batch 1 .* overtook a batch answered 202 before"):
        assert_per_key_order(records(swapped), ONE_AFTER_THE_OTHER, batch)
    assert_per_key_order(records(swapped), {0: (1, 3), 1: (2, 4)}, batch)  # in flight together: no order


def test_events_of_a_batch_out_of_order_fail() -> None:
    reversed_key = [(0, 3), (0, 0), *[(0, i) for i in (1, 2, 4, 5)], *[(1, i) for i in range(6)]]
    with pytest.raises(AssertionError, match="batch 0, key k0: events out of order"):
        assert_per_key_order(records(reversed_key), ONE_AFTER_THE_OTHER, batch)


def test_a_key_in_two_partitions_fails() -> None:
    moved = records(IN_ORDER)
    moved[-1] = Record(0, 99, moved[-1].key, moved[-1].headers, b"")  # k2's last record on k0's partition
    with pytest.raises(AssertionError, match="in two partitions"):
        assert_per_key_order(moved, ONE_AFTER_THE_OTHER, batch)


def test_overtaking_the_batch_just_before_fails() -> None:
    order = [(b, i) for b in (0, 2, 1) for i in range(6)]  # 2 answered 202 after 1 was sent, written before it
    with pytest.raises(AssertionError, match=r"batch 2 .* overtook"):
        assert_per_key_order(records(order), {0: (1, 2), 1: (3, 4), 2: (5, 6)}, batch)
