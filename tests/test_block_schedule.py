"""``dblocks.steps_per_block`` in :class:`dblocks_titan.block_schedule.BlockSchedule`: runs of K steps,
``peek``, and resume in the middle of a run (K = 1: ``test_config.py``'s schedule tests)."""

import pytest

from test_config import draws

from dblocks_titan.block_schedule import BlockSchedule


def make(kind: str, k: int, *, seed: int = 0, steps: int = 16, runs_from: int = 0):
    return BlockSchedule.Config(kind=kind, seed=seed, steps_per_block=k, steps_per_block_from=runs_from).build(
        num_blocks=4, total_steps=steps)


def test_a_drawn_block_trains_k_consecutive_steps():
    assert draws(make("round_robin", 3), 14) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0]
    assert draws(make("sequential", 2), 16) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4  # 8 runs, 2 per block
    assert draws(make("sequential", 3, steps=10), 10) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # 4 runs of 3
    once = draws(make("random", 1), 10)
    assert draws(make("random", 3), 30) == [b for b in once for _ in range(3)]  # the same draws, each 3 times


def test_runs_of_k_start_after_steps_per_block_from():
    assert draws(make("round_robin", 3, runs_from=5), 14) == [0, 1, 2, 3, 0] + [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # sequential: each phase its own sequence, 8 steps with K = 1, then 8 steps in 4 runs of 2
    assert draws(make("sequential", 2, runs_from=8), 16) == [0, 0, 1, 1, 2, 2, 3, 3] + [0, 0, 1, 1, 2, 2, 3, 3]
    once = draws(make("random", 1), 7)  # the first 4 draws one step each, then runs of 3
    assert draws(make("random", 3, runs_from=4), 13) == once[:4] + [b for b in once[4:] for _ in range(3)]


@pytest.mark.parametrize("kind", ["random", "round_robin", "sequential"])
@pytest.mark.parametrize("k,runs_from", [(1, 0), (3, 0), (3, 5)])
def test_peek_tells_the_next_block_without_drawing_it(kind, k, runs_from):
    schedule, reference = make(kind, k, runs_from=runs_from), make(kind, k, runs_from=runs_from)
    for _ in range(16):
        assert schedule.peek() == schedule.peek() == schedule.next() == reference.next()


@pytest.mark.parametrize("stop,runs_from", [(4, 0), (5, 0), (6, 0), (2, 4), (6, 4), (7, 4)])
def test_resume_in_the_middle_of_a_run(stop, runs_from):  # mid-run, at a run's end; before/after F
    schedule = make("random", 3, seed=3, steps=100, runs_from=runs_from)
    draws(schedule, stop)
    state = schedule.state_dict()
    expected = draws(schedule, 20)
    resumed = make("random", 3, seed=99, steps=100, runs_from=runs_from)
    resumed.load_state_dict(state)
    assert resumed.peek() == expected[0] and draws(resumed, 20) == expected


def test_k_1_saves_the_generator_after_the_draw_as_before():
    schedule = make("random", 1, seed=5)
    draws(schedule, 3)
    state = schedule.state_dict()
    assert state["draws"] == 3 and (state["generator"] == schedule.generator.get_state()).all()
