"""Multiple choice: ``"Q: Which is larger, 48 or 76?\\nA: 76"`` with choices ("48", "76").

Scored either by generation (exact match) or by comparing the log-likelihoods of
the choices as continuations of the prompt (multiple-choice accuracy, random
baseline 1/2). Both orders of a pair appear, so always answering the first (or
the second) number scores 1/2. The key is the unordered pair: "48 or 76" and
"76 or 48" share a split.
"""

from __future__ import annotations

import string

import numpy as np

from llm.tasks.arithmetic import check_digits, operand_range
from llm.tasks.base import (
    BRIER,
    EXACT_MATCH,
    MAX_ENUMERATED,
    MULTIPLE_CHOICE_ACCURACY,
    PER_TOKEN_ACCURACY,
    Item,
    Task,
)


class Larger(Task):
    """Which of two different k-digit numbers is larger."""

    def __init__(self, digits: int = 2, *, test_fraction: float = 0.2):
        check_digits(digits)
        super().__init__(test_fraction=test_fraction)
        self.digits = digits
        self.lo, self.hi = operand_range(digits)
        self.name = "larger"
        self.description = (
            f"which of two {digits}-digit numbers is larger (multiple choice)"
        )
        self.answer_alphabet = string.digits

    def item(self, a: int, b: int) -> Item:
        """The item comparing ``a`` and ``b`` (in that order); a != b."""
        if a == b:
            raise ValueError("larger needs two different numbers")
        return Item(
            prompt=f"Q: Which is larger, {a} or {b}?\nA: ",
            target=str(max(a, b)),
            key=f"larger:{min(a, b)},{max(a, b)}",
            choices=(str(a), str(b)),
            answer_index=0 if a > b else 1,
        )

    def sample(self, rng: np.random.Generator) -> Item:
        while True:
            a, b = rng.integers(self.lo, self.hi + 1, size=2)
            if a != b:
                return self.item(int(a), int(b))

    def all_items(self):
        span = range(self.lo, self.hi + 1)
        if len(span) ** 2 > MAX_ENUMERATED:
            return None
        return [self.item(a, b) for a in span for b in span if a != b]

    @property
    def baseline(self) -> dict[str, float]:
        """Picking one of the two numbers at random: 1/2 for choice and exact match;
        Brier of the uniform guess (1/2, 1/2): 1/2; per token: a uniform digit."""
        return {
            EXACT_MATCH: 0.5,
            MULTIPLE_CHOICE_ACCURACY: 0.5,
            BRIER: 0.5,
            PER_TOKEN_ACCURACY: 0.1,
        }
