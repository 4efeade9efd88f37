"""The split plan from case ids alone: validation drawn once per seed, iid dealing, by-source balancing."""

from __future__ import annotations

import pytest

from fedseg.common.datasets.partition import SplitRequest, held_out, plan_split
from fedseg.common.errors import ConfigError

CASES = [f"case_{i:03d}" for i in range(20)]
ORGANS = ("pancreas", "spleen", "kidney", "liver")


def test_the_validation_set_depends_on_the_seed_and_share_only() -> None:
    validation, rest = held_out(CASES, seed=7, fraction=0.25)
    assert len(validation) == 5 and sorted([*validation, *rest]) == CASES and not set(validation) & set(rest)
    for sites, scheme in ((2, "iid"), (5, "iid"), (4, "by-organ")):
        plan = plan_split(SplitRequest("d", CASES, ORGANS, sites, scheme, 7, 0.25))  # type: ignore[arg-type]
        assert plan.validation == validation
    assert held_out(CASES, seed=8, fraction=0.25)[0] != validation
    assert held_out(list(reversed(CASES)), seed=7, fraction=0.25)[0] == validation  # the input order is irrelevant


def test_iid_deals_every_remaining_case_once_as_evenly_as_possible() -> None:
    plan = plan_split(SplitRequest("d", CASES, ORGANS, 3, "iid", 0, 0.2))
    dealt = [c for site in plan.sites for c in site.cases]
    assert sorted(dealt) == sorted(set(CASES) - set(plan.validation)) and len(dealt) == 16
    assert [len(s.cases) for s in plan.sites] == [6, 5, 5]
    assert all(s.annotated == ORGANS for s in plan.sites)


def test_by_organ_cycles_the_organs_over_the_sites() -> None:
    plan = plan_split(SplitRequest("d", CASES, ORGANS, 5, "by-organ", 0, 0.2))
    assert [s.annotated for s in plan.sites] == [("pancreas",), ("spleen",), ("kidney",), ("liver",), ("pancreas",)]


def test_by_source_puts_the_largest_institutions_first_where_the_fewest_cases_are() -> None:
    sizes = {"A": 7, "B": 5, "C": 4, "D": 3, "E": 1}
    institutions = {}
    cases = []
    for name, count in sizes.items():
        for i in range(count):
            cases.append(f"{name}{i}")
            institutions[f"{name}{i}"] = name
    plan = plan_split(SplitRequest("d", cases, ORGANS, 2, "by-source", 0, 0.0), institutions)
    assert [s.institutions for s in plan.sites] == [("A", "D"), ("B", "C", "E")]  # 7+3 and 5+4+1
    assert [len(s.cases) for s in plan.sites] == [10, 10]


def test_a_case_without_an_institution_is_named() -> None:
    with pytest.raises(ConfigError, match="case b has no institution"):
        plan_split(SplitRequest("d", ["a", "b"], ORGANS, 1, "by-source", 0, 0.0), {"a": "X"})


@pytest.mark.parametrize(("sites", "fraction", "message"), [(0, 0.2, "at least 1"), (2, -0.1, "--val-fraction")])
def test_bad_numbers_are_refused(sites: int, fraction: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_split(SplitRequest("d", CASES, ORGANS, sites, "iid", 0, fraction))
