"""The training loop's time limit judges before a step whether it would end in time (by the longest so far)."""

from __future__ import annotations

from fedseg.common.engine.train import TimeLimit


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_more_item_must_fit_as_long_as_the_longest_so_far() -> None:
    clock = Clock()
    limit = TimeLimit(10.0, clock)
    clock.now += 1.0  # set-up counts against the limit
    limit.mark()
    assert not limit.exhausted()  # nothing to judge by: the first item runs
    clock.now += 4.0  # a slow first item (warm-up)
    limit.lap()
    clock.now += 1.0
    limit.lap()
    assert limit.longest == 4.0 and not limit.exhausted()  # 6 s gone + 4 s = 10: still fits
    clock.now += 0.5
    limit.lap()
    assert limit.exhausted()  # 6.5 + 4 > 10: stop now rather than end 0.5 s late


def test_no_limit_is_never_exhausted() -> None:
    clock = Clock()
    limit = TimeLimit(None, clock)
    clock.now += 1e9
    limit.lap()
    assert not limit.exhausted()
