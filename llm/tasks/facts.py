"""Memorised facts: a fixed, seeded table of short keys mapped to random values.

``"Q: k7\\nA: qhzrmbxa"``. Nothing in the prompt predicts the value, so the only
way to answer is to have memorised the table from pre-training: this is a
memorisation task (``memorisation = True``), its test items ARE its train items.
The pilot of issue 10 used 768 two-character keys each mapped to 8 random
characters; a byte-level model's per-token accuracy then rises smoothly with
size while exact match (about per-token accuracy ** 8) jumps (Schaeffer et al. 2023).
"""

from __future__ import annotations

import string

import numpy as np

from llm.tasks.base import EXACT_MATCH, PER_TOKEN_ACCURACY, Item, ListedTask

KEY_ALPHABET = string.ascii_lowercase + string.digits
VALUE_ALPHABET = string.ascii_lowercase


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def fact_table(
    n_keys: int, key_len: int, value_len: int, table_seed: int
) -> list[tuple[str, str]]:
    """``n_keys`` (key, value) pairs: distinct keys of ``key_len`` characters from
    KEY_ALPHABET, values of ``value_len`` characters from VALUE_ALPHABET, in key order."""
    rng = np.random.default_rng([0xFAC7, table_seed])
    n_possible = len(KEY_ALPHABET) ** key_len
    codes = np.sort(rng.choice(n_possible, size=n_keys, replace=False))
    table = []
    for code in codes:
        code, chars = int(code), []
        for _ in range(key_len):
            code, r = divmod(code, len(KEY_ALPHABET))
            chars.append(KEY_ALPHABET[r])
        value = rng.integers(0, len(VALUE_ALPHABET), size=value_len)
        table.append(
            ("".join(reversed(chars)), "".join(VALUE_ALPHABET[i] for i in value))
        )
    return table


class Facts(ListedTask):
    """A fixed table of ``n_keys`` keys, each mapped to ``value_len`` random letters."""

    memorisation = True

    def __init__(
        self,
        n_keys: int = 768,
        key_len: int = 2,
        value_len: int = 8,
        table_seed: int = 0,
    ):
        super().__init__()
        self.key_len = _check_int("key_len", key_len, 1, 4)
        self.n_keys = _check_int("n_keys", n_keys, 1, len(KEY_ALPHABET) ** key_len)
        self.value_len = _check_int("value_len", value_len, 1, 64)
        self.table_seed = _check_int("table_seed", table_seed, 0, 2**63 - 1)
        self.name = "facts"
        self.description = f"memorised facts: {n_keys} keys of {key_len} characters -> {value_len} random letters"
        self.answer_alphabet = VALUE_ALPHABET
        self.table = fact_table(
            self.n_keys, self.key_len, self.value_len, self.table_seed
        )
        self._items = [
            Item(prompt=f"Q: {k}\nA: ", target=v, key=f"fact:{k}")
            for k, v in self.table
        ]

    @property
    def baseline(self) -> dict[str, float]:
        """A uniform guess of each value letter."""
        p = 1.0 / len(VALUE_ALPHABET)
        return {EXACT_MATCH: p**self.value_len, PER_TOKEN_ACCURACY: p}
