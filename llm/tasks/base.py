"""The task types: an ``Item`` (prompt, target, optional choices) and a ``Task`` that draws them.

A task draws items from an item space. Each item has a canonical ``key``; the
train/test split is a fixed hash of that key (``test_fraction`` of the key space
is test), so train and test are disjoint by construction, for every seed, in
every process, and items that share a key (``48 + 76`` and ``76 + 48``) always
fall on the same side. Memorisation tasks (facts seen in pre-training) say so
with ``memorisation = True``: their train and test items are the same set.

Prompts end where the answer starts (``"Q: What is 48 plus 76?\\nA: "``) and the
target carries no leading space, so per-token metrics count only answer
characters. Targets are single lines: generation stops at ``stop``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# Metric names of the random baselines, spelled as analysis.emergence_metrics spells
# the metrics (analysis computes them from the eval records; llm cannot import it).
EXACT_MATCH = "exact_match"
PER_TOKEN_ACCURACY = (
    "token_accuracy"  # per target character (= token for a byte-level model)
)
MULTIPLE_CHOICE_ACCURACY = "mc_accuracy"
BRIER = "brier"  # sum over choices of (p_k - onehot_k)^2; lower is better

# Spaces up to this size are enumerated once and cached; larger ones are sampled.
MAX_ENUMERATED = 100_000

# Versioned so that a change of the split rule is visible in code review, never silent.
_SPLIT_SALT = "chinchax-task-split/1:"

# Streams of one task never share random numbers.
_PURPOSE = {"test": 1, "train": 2, "few_shot": 3, "pretraining": 4}


@dataclass(frozen=True)
class Item:
    """One task example: ``prompt + target`` is the full text; ``key`` decides its split.

    ``choices`` and ``answer_index`` are set for multiple choice
    (``choices[answer_index] == target``); each choice is a continuation of the prompt.
    """

    prompt: str
    target: str
    key: str
    choices: tuple[str, ...] = ()
    answer_index: int | None = None

    def __post_init__(self):
        if not self.key:
            raise ValueError("Item.key must be a non-empty canonical key")
        if self.choices or self.answer_index is not None:
            if self.answer_index is None or not 0 <= self.answer_index < len(
                self.choices
            ):
                raise ValueError(
                    f"answer_index {self.answer_index} is not an index of {len(self.choices)} choices"
                )
            if self.choices[self.answer_index] != self.target:
                raise ValueError(
                    f"choices[{self.answer_index}] = {self.choices[self.answer_index]!r} is not the target {self.target!r}"
                )

    @property
    def text(self) -> str:
        """The item as a training document fragment: prompt followed by target."""
        return self.prompt + self.target


def key_fraction(key: str) -> float:
    """A fixed uniform number in [0, 1) for a key (blake2b, the same in every process)."""
    digest = hashlib.blake2b((_SPLIT_SALT + key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _check_count(n: int, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {n!r}")
    return int(n)


class Task:
    """A generated task. Subclasses set the attributes and implement ``sample``
    (and ``all_items`` when the item space is small).

    Attributes: ``name`` (registry name), ``params`` (the parameters it was built
    with), ``description``, ``memorisation``, ``few_shot_separator``, ``stop``
    (generation stops at any of these), ``answer_alphabet`` (characters a target
    is made of), ``baseline`` (metric name -> accuracy of random guessing),
    ``test_fraction`` (share of the key space held out; 0 for memorisation tasks).
    """

    name: str = ""
    description: str = ""
    memorisation: bool = False
    few_shot_separator: str = "\n\n"
    stop: tuple[str, ...] = ("\n",)
    answer_alphabet: str = ""
    test_fraction: float = 0.2

    def __init__(self, *, test_fraction: float = 0.2):
        if self.memorisation:
            test_fraction = 0.0
        elif not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.test_fraction = float(test_fraction)
        self.params: dict = {}
        self._pools: dict[str, list[Item]] | None = None

    # ------------------------------------------------------------------ subclass hooks

    def sample(self, rng: np.random.Generator) -> Item:
        """One item drawn from the whole item space (either split)."""
        raise NotImplementedError

    def all_items(self) -> Sequence[Item] | None:
        """Every item, in a fixed order, when the space has at most MAX_ENUMERATED items; else None."""
        return None

    @property
    def baseline(self) -> dict[str, float]:
        """Random-guessing accuracy per metric (see each task for the guessing rule)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ splits

    def in_test(self, key: str) -> bool:
        """Whether items with this canonical key are test items."""
        return self.memorisation or key_fraction(key) < self.test_fraction

    def in_train(self, key: str) -> bool:
        """Whether items with this canonical key are train items (may appear in pre-training)."""
        return self.memorisation or key_fraction(key) >= self.test_fraction

    def _in_split(self, split: str, key: str) -> bool:
        return self.in_test(key) if split == "test" else self.in_train(key)

    def _pool(self, split: str) -> list[Item] | None:
        """All items of a split, for enumerable spaces (cached); None for large spaces."""
        if self._pools is None:
            items = self.all_items()
            if items is None:
                return None
            self._pools = {
                s: [it for it in items if self._in_split(s, it.key)]
                for s in ("train", "test")
            }
        return self._pools[split]

    def split_size(self, split: str) -> int | None:
        """Number of distinct items in ``"train"`` or ``"test"``; None when the space is too large to count."""
        pool = self._pool(split)
        return None if pool is None else len(pool)

    def _rng(self, purpose: str, seed: int, *extra: int) -> np.random.Generator:
        if (
            isinstance(seed, bool)
            or not isinstance(seed, (int, np.integer))
            or seed < 0
        ):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        # The task name is mixed in so that two tasks with one seed draw unrelated items.
        return np.random.default_rng(
            [_stable_int(self.name), _PURPOSE[purpose], int(seed), *extra]
        )

    def _draw(
        self,
        split: str,
        n: int,
        rng: np.random.Generator,
        exclude_key: str | None = None,
    ) -> list[Item]:
        """Up to n distinct items of a split (all of them when the split is smaller), in random order."""
        pool = self._pool(split)
        if pool is not None:
            # A few spare draws cover the excluded key (at most two items share one, e.g.
            # 48 + 76 and 76 + 48); shuffle all of a pool only when that is not enough.
            spare = 0 if exclude_key is None else 2
            picks = rng.choice(len(pool), size=min(len(pool), n + spare), replace=False)
            out = [pool[i] for i in picks if pool[i].key != exclude_key][:n]
            if len(out) < n and len(picks) < len(pool):
                out = [
                    pool[i]
                    for i in rng.permutation(len(pool))
                    if pool[i].key != exclude_key
                ][:n]
            return out
        out: list[Item] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n + 10_000:
                raise RuntimeError(
                    f"task {self.name}: could not draw {n} distinct {split} items"
                )
            item = self.sample(rng)
            if (
                item.text in seen
                or item.key == exclude_key
                or not self._in_split(split, item.key)
            ):
                continue
            seen.add(item.text)
            out.append(item)
        return out

    # ------------------------------------------------------------------ public API

    def test_items(self, n: int, seed: int) -> list[Item]:
        """``min(n, split_size("test"))`` distinct held-out items, a function of (task, seed)."""
        return self._draw("test", _check_count(n, "n"), self._rng("test", seed))

    def train_items(self, n: int, seed: int) -> list[Item]:
        """``min(n, split_size("train"))`` distinct train items, a function of (task, seed)."""
        return self._draw("train", _check_count(n, "n"), self._rng("train", seed))

    def train_stream(self, seed: int) -> Iterator[Item]:
        """An endless stream of train items: shuffled epochs of a small split, i.i.d. draws of a large one."""
        rng = self._rng("pretraining", seed)
        pool = self._pool("train")
        if pool is not None:
            if not pool:
                raise ValueError(
                    f"task {self.name} has no train items (test_fraction {self.test_fraction})"
                )
            while True:
                for i in rng.permutation(len(pool)):
                    yield pool[i]
        while True:
            item = self.sample(rng)
            if self.in_train(item.key):
                yield item

    def few_shot_items(self, item: Item, shots: int, seed: int) -> list[Item]:
        """``shots`` train items to show before ``item``, never ``item``'s own key.

        The demonstrations depend on (seed, item), so every query gets its own
        and the same query always gets the same.
        """
        shots = _check_count(shots, "shots")
        rng = self._rng("few_shot", seed, _stable_int(item.key))
        demos = self._draw("train", shots, rng, exclude_key=item.key)
        if len(demos) < shots:
            raise ValueError(
                f"task {self.name}: {shots} shots asked, the train split holds {len(demos)} other items"
            )
        return demos

    def few_shot_prompt(self, item: Item, shots: int, seed: int) -> str:
        """GPT-3 format: ``shots`` train demonstrations (prompt + target) joined by the
        separator, then the query's prompt. The model's continuation is scored against ``item.target``."""
        demos = self.few_shot_items(item, shots, seed)
        return self.few_shot_separator.join([d.text for d in demos] + [item.prompt])

    def pretraining_text(
        self, n_items: int | None, seed: int, items_per_document: int = 16
    ) -> Iterator[str]:
        """Documents of train items (each ``items_per_document`` items joined by the separator,
        the few-shot format) for mixing into pre-training; ``n_items`` in all, or endless
        when None (stop at a character budget). Test items never appear (unless memorisation)."""
        per_doc = _check_count(items_per_document, "items_per_document")
        if per_doc == 0:
            raise ValueError("items_per_document must be at least 1")
        left = None if n_items is None else _check_count(n_items, "n_items")
        stream = self.train_stream(seed)
        while left is None or left > 0:
            k = per_doc if left is None else min(per_doc, left)
            yield self.few_shot_separator.join(next(stream).text for _ in range(k))
            if left is not None:
                left -= k

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"get_task({self.name!r}{', ' if params else ''}{params})"


class ListedTask(Task):
    """A task whose whole item space is a fixed list ``self._items``, built in ``__init__``."""

    _items: list[Item]

    def sample(self, rng: np.random.Generator) -> Item:
        return self._items[int(rng.integers(len(self._items)))]

    def all_items(self) -> Sequence[Item]:
        return self._items
