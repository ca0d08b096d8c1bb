"""Arithmetic in the GPT-3 few-shot format (Brown et al. 2020, Section 3.9.1):
``"Q: What is 48 plus 76?\\nA: 124"``.

k-digit operands have exactly k digits (0..9 for k = 1), so the item spaces of
different k are disjoint and training on 3-digit sums leaks no 2-digit test item.
With ``reversed_digits`` the answer is written least significant digit first
(Lee et al. 2023, "Teaching Arithmetic to Small Transformers": ``"A: 421"`` for
124; the sign of a difference stays in front), which small models learn far
more easily because each output digit then depends only on digits already seen.

The canonical key is the operation and the *unordered* operand pair, so
``48 + 76`` and ``76 + 48`` always share a split, and a reversed and a plain
variant of one task split identically.
"""

from __future__ import annotations

import string

import numpy as np

from llm.tasks.base import EXACT_MATCH, MAX_ENUMERATED, PER_TOKEN_ACCURACY, Item, Task

OPERATIONS = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
}


def check_digits(digits) -> None:
    """ValueError unless ``digits`` is an integer number of digits in 1..9."""
    if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ValueError(f"digits must be an integer in 1..9, got {digits!r}")


def operand_range(digits: int) -> tuple[int, int]:
    """Smallest and largest operand with exactly ``digits`` digits (0..9 for one digit)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def write_number(value: int, reversed_digits: bool) -> str:
    """Decimal digits of ``value``, least significant first when ``reversed_digits`` (sign in front)."""
    digits = str(abs(value))
    if reversed_digits:
        digits = digits[::-1]
    return ("-" if value < 0 else "") + digits


class Arithmetic(Task):
    """``a <op> b`` for two k-digit operands; op one of plus, minus, times."""

    def __init__(
        self,
        op: str,
        digits: int,
        *,
        reversed_digits: bool = False,
        test_fraction: float = 0.2,
    ):
        if op not in OPERATIONS:
            raise ValueError(
                f"unknown operation {op!r}; choose one of {', '.join(OPERATIONS)}"
            )
        check_digits(digits)
        super().__init__(test_fraction=test_fraction)
        self.op, self.digits, self.reversed_digits = op, digits, bool(reversed_digits)
        self.lo, self.hi = operand_range(digits)
        short = {"plus": "add", "minus": "sub", "times": "mul"}[op]
        self.name = f"{short}{digits}" + ("_reversed" if reversed_digits else "")
        self.description = f"{digits}-digit {op}" + (
            ", answer digits reversed" if reversed_digits else ""
        )
        # Subtraction may go negative (as in GPT-3), so '-' is an answer character too.
        self.answer_alphabet = string.digits + ("-" if op == "minus" else "")

    def item(self, a: int, b: int) -> Item:
        """The item for ``a <op> b``."""
        result = OPERATIONS[self.op](a, b)
        return Item(
            prompt=f"Q: What is {a} {self.op} {b}?\nA: ",
            target=write_number(result, self.reversed_digits),
            key=f"{self.op}:{min(a, b)},{max(a, b)}",
        )

    def sample(self, rng: np.random.Generator) -> Item:
        a, b = rng.integers(self.lo, self.hi + 1, size=2)
        return self.item(int(a), int(b))

    def all_items(self):
        span = range(self.lo, self.hi + 1)
        if len(span) ** 2 > MAX_ENUMERATED:
            return None
        return [self.item(a, b) for a in span for b in span]

    @property
    def baseline(self) -> dict[str, float]:
        """Exact match: a uniform guess among the integers between the smallest and the
        largest possible answer; per token: a uniform guess from the answer alphabet."""
        ends = [
            OPERATIONS[self.op](a, b)
            for a in (self.lo, self.hi)
            for b in (self.lo, self.hi)
        ]
        return {
            EXACT_MATCH: 1.0 / (max(ends) - min(ends) + 1),
            PER_TOKEN_ACCURACY: 1.0 / len(self.answer_alphabet),
        }


class ModularAddition(Task):
    """``(a + b) mod m`` for a, b in 0..m-1: ``"Q: What is 48 plus 76 mod 97?\\nA: 27"``."""

    def __init__(self, modulus: int = 97, *, test_fraction: float = 0.2):
        if (
            isinstance(modulus, bool)
            or not isinstance(modulus, int)
            or not 2 <= modulus <= 10**6
        ):
            raise ValueError(
                f"modulus must be an integer in 2..1000000, got {modulus!r}"
            )
        super().__init__(test_fraction=test_fraction)
        self.modulus = modulus
        self.name = "modadd"
        self.description = f"addition modulo {modulus}"
        self.answer_alphabet = string.digits[: min(10, modulus)]

    def item(self, a: int, b: int) -> Item:
        """The item for ``(a + b) mod m``."""
        m = self.modulus
        return Item(
            prompt=f"Q: What is {a} plus {b} mod {m}?\nA: ",
            target=str((a + b) % m),
            key=f"mod{m}:plus:{min(a, b)},{max(a, b)}",
        )

    def sample(self, rng: np.random.Generator) -> Item:
        a, b = rng.integers(0, self.modulus, size=2)
        return self.item(int(a), int(b))

    def all_items(self):
        if self.modulus**2 > MAX_ENUMERATED:
            return None
        return [
            self.item(a, b) for a in range(self.modulus) for b in range(self.modulus)
        ]

    @property
    def baseline(self) -> dict[str, float]:
        """Exact match: a uniform guess among the m residues; per token: among the digits."""
        return {
            EXACT_MATCH: 1.0 / self.modulus,
            PER_TOKEN_ACCURACY: 1.0 / len(self.answer_alphabet),
        }
