"""The copy/reverse reward tasks: exact rewards on handcrafted completions, chance, registry."""

from __future__ import annotations

import random

import pytest

from rlsync.model_config import ModelConfig
from trainer_side.rl.config import TaskConfig
from trainer_side.rl.task import SEP, Task, TaskError, get_task

CFG = ModelConfig(vocab_size=64)


@pytest.fixture
def copy_task() -> Task:
    return get_task("copy_sequence", CFG)


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ([3, 1, 4, 1], 1.0),
        ([3, 1, 4, 2], 0.75),
        ([1, 3, 1, 4], 0.0),
        ([3, 9, 9, 1], 0.5),
        ([3], 0.25),
        ([], 0.0),
        ([3, 1, 4, 1, 5, 9, 2], 1.0),  # tokens past the answer are ignored
        ([0, 1, 0, 1], 0.5),
    ],
)
def test_copy_rewards_are_exact(copy_task: Task, completion: list[int], reward: float) -> None:
    assert copy_task.reward([3, 1, 4, 1, SEP], completion) == reward


@pytest.mark.parametrize(
    ("completion", "reward"), [([1, 4, 1, 3], 1.0), ([3, 1, 4, 1], 0.0), ([1, 4, 9, 9], 0.5)]
)
def test_reverse_rewards_are_exact(completion: list[int], reward: float) -> None:
    task = get_task("reverse_sequence", CFG)
    assert task.reward([3, 1, 4, 1, SEP], completion) == reward


def test_prompts_are_symbols_then_separator(copy_task: Task) -> None:
    prompts = copy_task.sample_prompts(200, random.Random(0))
    assert all(len(p) == copy_task.length + 1 and p[-1] == SEP for p in prompts)
    symbols = {s for p in prompts for s in p[:-1]}
    assert symbols == set(range(1, copy_task.alphabet + 1))
    assert prompts == copy_task.sample_prompts(200, random.Random(0))
    assert copy_task.reward(prompts[0], copy_task.target(prompts[0])) == copy_task.max_reward


def test_chance_reward_matches_a_uniform_random_policy(copy_task: Task) -> None:
    rng = random.Random(1)
    prompts = copy_task.sample_prompts(20000, rng)
    rewards = [
        copy_task.reward(p, [rng.randrange(CFG.vocab_size) for _ in range(4)]) for p in prompts
    ]
    assert copy_task.chance_reward == 1 / 64
    assert sum(rewards) / len(rewards) == pytest.approx(copy_task.chance_reward, abs=0.003)


def test_no_constant_answer_scores_well(copy_task: Task) -> None:
    """The prompt must be read: the best fixed completion earns about 1/alphabet."""
    prompts = copy_task.sample_prompts(4000, random.Random(2))
    best = max(
        sum(copy_task.reward(p, [s] * 4) for p in prompts) / len(prompts)
        for s in range(1, copy_task.alphabet + 1)
    )
    assert best == pytest.approx(1 / copy_task.alphabet, abs=0.02)


def test_default_task_name_is_registered() -> None:
    task = get_task(TaskConfig().name, CFG)
    assert (task.length, task.alphabet, task.answer_len) == (4, 8, 4)


def test_options_and_bad_names() -> None:
    assert get_task("copy_sequence", CFG, length=6, alphabet=20).answer_len == 6
    with pytest.raises(TaskError, match="unknown"):
        get_task("sort", CFG)
    with pytest.raises(TaskError, match="alphabet"):
        get_task("copy_sequence", ModelConfig(vocab_size=8), alphabet=8)
    with pytest.raises(TaskError, match="length"):
        get_task("copy_sequence", CFG, length=0)
