"""``unique_step_ids``: every step of a plan gets an id of its own (issue 16)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from keel.activities.types import STEP_ID_MAX_CHARS, PlanStep, unique_step_ids


def step(step_id: str, *depends_on: str) -> PlanStep:
    return PlanStep(id=step_id, kind="tool", tool="write_note", depends_on=list(depends_on))


def test_repeats_are_numbered_and_the_first_keeps_its_id() -> None:
    steps = [step("s1"), step("s1"), step("s2"), step("s1"), step("s1~2")]
    assert [s.id for s in unique_step_ids(steps)] == ["s1", "s1~3", "s2", "s1~4", "s1~2"]
    assert [s.id for s in steps] == ["s1", "s1", "s2", "s1", "s1~2"]  # the input is untouched


def test_a_dependency_on_a_repeated_id_waits_for_every_step_that_had_it() -> None:
    steps = [step("a"), step("a"), step("b", "a"), step("a", "a")]
    renamed = unique_step_ids(steps)
    assert [s.id for s in renamed] == ["a", "a~2", "b", "a~3"]
    assert renamed[2].depends_on == ["a", "a~2", "a~3"]
    assert renamed[3].depends_on == ["a", "a~2"]  # never on itself


def test_plans_without_repeats_come_back_as_they_were() -> None:
    steps = [step("s1"), step("s2", "s1")]
    assert unique_step_ids(steps) == steps


def test_a_long_repeated_id_is_cut_to_fit() -> None:
    long_id = "x" * STEP_ID_MAX_CHARS
    renamed = unique_step_ids([step(long_id), step(long_id)])
    assert renamed[1].id == "x" * (STEP_ID_MAX_CHARS - 2) + "~2"
    PlanStep.model_validate(renamed[1].model_dump())  # still a valid step after a round trip


@given(st.lists(st.sampled_from(["s1", "s2", "s1~2", "x" * STEP_ID_MAX_CHARS]), max_size=16))
def test_ids_come_out_unique_valid_and_stable(ids: list[str]) -> None:
    renamed = unique_step_ids([step(i) for i in ids])
    new_ids = [s.id for s in renamed]
    assert len(set(new_ids)) == len(ids)
    assert all(len(i) <= STEP_ID_MAX_CHARS for i in new_ids)
    assert unique_step_ids(renamed) == renamed  # applying it again changes nothing
