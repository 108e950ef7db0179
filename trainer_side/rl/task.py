"""Rule-based reward tasks over raw token ids (no tokenizer), for learning tests and demos.

`copy_sequence` (the default): the prompt is `length` symbols followed by a separator,
e.g. `[7, 3, 3, 12, SEP]`; the policy must answer with the same symbols in the same order.
The reward is per-position partial credit: the share of the first `length` completion
tokens that equal the prompt's symbol at that position (tokens past `length` are ignored,
a short completion loses the missing positions). A constant answer cannot score well: the
symbols are drawn at random, so the policy has to read the prompt. Symbols are the ids
1..alphabet (token 0 is the separator); a uniformly random policy over the whole vocab
scores exactly 1/vocab_size. `reverse_sequence` is the same with the answer reversed.

The vocabulary is the model's vocab of integer token ids. Knows nothing about models,
PPO or engines.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from rlsync.model_config import ModelConfig

SEP = 0


class TaskError(ValueError):
    """A task name or option that cannot work with this model; the message names it."""


class Task:
    """Copy (or reverse) `length` prompt symbols; reward in [0, 1] with per-position credit."""

    def __init__(
        self, vocab_size: int, *, length: int = 4, alphabet: int = 8, reverse: bool = False
    ) -> None:
        if length <= 0:
            raise TaskError(f"length must be > 0, got {length}")
        if not 1 <= alphabet < vocab_size:
            raise TaskError(f"alphabet={alphabet} must be in [1, vocab_size={vocab_size})")
        self.vocab_size, self.length, self.alphabet = vocab_size, length, alphabet
        self.reverse = reverse

    @property
    def answer_len(self) -> int:
        """Completion tokens the reward reads; sample at least this many new tokens."""
        return self.length

    @property
    def max_reward(self) -> float:
        return 1.0

    @property
    def chance_reward(self) -> float:
        """Expected reward of a policy uniform over the vocab (exact): each position 1/V."""
        return 1.0 / self.vocab_size

    def sample_prompts(self, n: int, rng: random.Random) -> list[list[int]]:
        """n prompts: `length` symbols from 1..alphabet, then SEP."""
        return [
            [rng.randint(1, self.alphabet) for _ in range(self.length)] + [SEP] for _ in range(n)
        ]

    def target(self, prompt: Sequence[int]) -> list[int]:
        """The answer the task rewards fully."""
        symbols = list(prompt[: self.length])
        return symbols[::-1] if self.reverse else symbols

    def reward(self, prompt: Sequence[int], completion_ids: Sequence[int]) -> float:
        """Share of answer positions the completion gets right, in [0, 1]."""
        hits = sum(int(a == b) for a, b in zip(completion_ids, self.target(prompt), strict=False))
        return hits / self.length


TaskFactory = Callable[..., Task]

TASKS: dict[str, TaskFactory] = {
    "copy_sequence": lambda vocab, **kw: Task(vocab, **kw),
    "reverse_sequence": lambda vocab, **kw: Task(vocab, reverse=True, **kw),
}


def get_task(name: str, cfg: ModelConfig, **options: int) -> Task:
    """The task registered as `name`, over cfg's vocab; options: length, alphabet."""
    if name not in TASKS:
        raise TaskError(f"task {name!r} is unknown (known: {', '.join(sorted(TASKS))})")
    return TASKS[name](cfg.vocab_size, **options)
