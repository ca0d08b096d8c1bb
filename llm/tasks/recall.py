"""In-context tasks: the answer is in the prompt, so they test induction, not knowledge.

``copy``: a random string, then the same string again (the induction-head
pattern of Olsson et al. 2022): ``"Q: Copy qhzrmbxa\\nA: qhzrmbxa"``.
``recall``: associative recall (Ba et al. 2016; Zoology, Arora et al. 2023):
key-value pairs, then a query key: ``"Q: c=4, q=7, x=0. What is q?\\nA: 7"``.

Both item spaces are astronomically large, so items are sampled; the split is
still by a hash of the whole item, so a test string is never trained on.
"""

from __future__ import annotations

import string

import numpy as np

from llm.tasks.base import EXACT_MATCH, PER_TOKEN_ACCURACY, Item, Task


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


class Copying(Task):
    """Copy a random string of ``length`` lowercase letters."""

    def __init__(self, length: int = 8, *, test_fraction: float = 0.2):
        super().__init__(test_fraction=test_fraction)
        self.length = _check_int(
            "length", length, 4, 256
        )  # 26**4 strings: room for distinct items
        self.name = "copy"
        self.description = f"copy a random string of {length} letters (induction)"
        self.answer_alphabet = string.ascii_lowercase

    def item(self, text: str) -> Item:
        """The item that asks to copy ``text``."""
        return Item(prompt=f"Q: Copy {text}\nA: ", target=text, key=f"copy:{text}")

    def sample(self, rng: np.random.Generator) -> Item:
        letters = rng.integers(0, len(self.answer_alphabet), size=self.length)
        return self.item("".join(self.answer_alphabet[i] for i in letters))

    @property
    def baseline(self) -> dict[str, float]:
        """A uniform guess of each letter."""
        p = 1.0 / len(self.answer_alphabet)
        return {EXACT_MATCH: p**self.length, PER_TOKEN_ACCURACY: p}


class AssociativeRecall(Task):
    """``n_pairs`` pairs of a distinct letter and a ``value_len``-digit value, then a query letter."""

    def __init__(
        self, n_pairs: int = 6, value_len: int = 1, *, test_fraction: float = 0.2
    ):
        super().__init__(test_fraction=test_fraction)
        self.n_pairs = _check_int("n_pairs", n_pairs, 2, 26)
        self.value_len = _check_int("value_len", value_len, 1, 16)
        self.name = "recall"
        self.description = (
            f"associative recall: {n_pairs} key=value pairs, then a query key"
        )
        self.answer_alphabet = string.digits

    def item(self, pairs: list[tuple[str, str]], query: str) -> Item:
        """The item for the given (key, value) pairs and query key."""
        values = dict(pairs)
        context = ", ".join(f"{k}={v}" for k, v in pairs)
        return Item(
            prompt=f"Q: {context}. What is {query}?\nA: ",
            target=values[query],
            key=f"recall:{context};{query}",
        )

    def sample(self, rng: np.random.Generator) -> Item:
        keys = rng.choice(
            list(string.ascii_lowercase), size=self.n_pairs, replace=False
        )
        digits = rng.integers(0, 10, size=(self.n_pairs, self.value_len))
        pairs = [(str(k), "".join(map(str, row))) for k, row in zip(keys, digits)]
        return self.item(pairs, pairs[int(rng.integers(self.n_pairs))][0])

    @property
    def baseline(self) -> dict[str, float]:
        """A uniform guess of each digit (ignoring the context; a guess among the
        values in context would score 1/n_pairs exact match)."""
        return {EXACT_MATCH: 0.1**self.value_len, PER_TOKEN_ACCURACY: 0.1}
