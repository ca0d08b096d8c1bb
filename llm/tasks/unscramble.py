"""Word unscramble (GPT-3's "anagrams of all letters"): ``"Q: Unscramble tlsteer\\nA: letters"``.

Words come from a list passed in or from the most frequent lowercase words of a
builtin corpus (read on first use, not at import). Each word has one fixed
scramble (a hash of the word), and words that are anagrams of an earlier word
are dropped, so every scramble has exactly one answer. The canonical key is the
word's multiset of letters: a test word is never seen in training, in any order.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import string
from collections.abc import Sequence

import numpy as np

from llm.tasks.base import EXACT_MATCH, PER_TOKEN_ACCURACY, Item, ListedTask, _stable_int


@functools.lru_cache(maxsize=4)
def _ranked_words(corpus: str) -> tuple[str, ...]:
    """All-lowercase words of a builtin corpus, most frequent first (ties alphabetical)."""
    from llm.data.builtin import builtin_corpus  # reads package files: only when asked

    _, documents = builtin_corpus(corpus)
    counts: collections.Counter[str] = collections.Counter()
    for _, text in documents:
        counts.update(w for w in re.findall(r"[A-Za-z]+", text) if w.islower())
    return tuple(sorted(counts, key=lambda w: (-counts[w], w)))


def corpus_words(
    corpus: str = "kjv", n_words: int = 2000, min_len: int = 4, max_len: int = 8
) -> tuple[str, ...]:
    """The ``n_words`` most frequent all-lowercase words of ``min_len``..``max_len``
    letters in a builtin corpus (``kjv``, ``gcide``, ``english``), most frequent first."""
    return tuple(
        [w for w in _ranked_words(corpus) if min_len <= len(w) <= max_len][:n_words]
    )


def scramble(word: str) -> str:
    """A fixed permutation of the letters of ``word`` that differs from it (two distinct letters needed)."""
    if len(set(word)) < 2:
        raise ValueError(f"cannot scramble {word!r}: it needs two different letters")
    rng = np.random.default_rng([0x5C4A, _stable_int(word)])
    while True:
        out = "".join(word[i] for i in rng.permutation(len(word)))
        if out != word:
            return out


def _arrangements(word: str) -> int:
    """Distinct orderings of the letters of ``word`` (a multinomial coefficient)."""
    n = math.factorial(len(word))
    for c in collections.Counter(word).values():
        n //= math.factorial(c)
    return n


class Unscramble(ListedTask):
    """Unscramble a word; the word list is ``words`` or taken from ``corpus``."""

    def __init__(
        self,
        words: Sequence[str] | None = None,
        corpus: str = "kjv",
        n_words: int = 2000,
        min_len: int = 4,
        max_len: int = 8,
        *,
        test_fraction: float = 0.2,
    ):
        super().__init__(test_fraction=test_fraction)
        if words is None:
            words = corpus_words(corpus, n_words, min_len, max_len)
            source = f"the {len(words)} most frequent {min_len}-{max_len} letter words of builtin:{corpus}"
        else:
            if isinstance(words, str) or not all(isinstance(w, str) for w in words):
                raise ValueError("words must be a list of strings")
            bad = [w for w in words if not w or set(w) - set(string.ascii_lowercase)]
            if bad:
                raise ValueError(
                    f"words must be lowercase letters a-z only, got {bad[0]!r}"
                )
            source = f"{len(words)} given words"
        kept, seen = [], set()
        for w in words:
            letters = "".join(sorted(w))
            if len(set(w)) >= 2 and letters not in seen:  # one answer per scramble
                seen.add(letters)
                kept.append(w)
        if not kept:
            raise ValueError(
                "unscramble needs at least one word with two different letters"
            )
        self.words = tuple(kept)
        self.name = "unscramble"
        self.description = f"unscramble a word; {source}"
        self.answer_alphabet = string.ascii_lowercase
        self._items = [self.item(w) for w in self.words]

    def item(self, word: str) -> Item:
        """The item that asks to unscramble ``word``."""
        return Item(
            prompt=f"Q: Unscramble {scramble(word)}\nA: ",
            target=word,
            key=f"letters:{''.join(sorted(word))}",
        )

    @property
    def baseline(self) -> dict[str, float]:
        """Exact match: a random ordering of the given letters (mean over test words,
        all words when the test split is empty); per token: a uniform letter."""
        test = self._pool("test") or self._items
        return {
            EXACT_MATCH: sum(1.0 / _arrangements(it.target) for it in test) / len(test),
            PER_TOKEN_ACCURACY: 1.0 / len(self.answer_alphabet),
        }
