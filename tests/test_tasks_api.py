"""llm.tasks: the registry, determinism, train/test disjointness, few-shot prompts, pre-training text."""

import itertools
import re

import pytest

from llm.tasks import TASKS, ConfigError, Item, get_task, key_fraction

WORDS = [
    "letters",
    "stone",
    "water",
    "house",
    "garden",
    "silver",
    "number",
    "bright",
    "window",
    "planet",
]


def _build(name):
    return get_task(name, words=WORDS) if name == "unscramble" else get_task(name)


ALL = sorted(TASKS)


def test_registry_builds_every_task_with_its_name_and_baselines():
    for name in ALL:
        task = _build(name)
        assert task.name == name and task.description
        assert "exact_match" in task.baseline and "token_accuracy" in task.baseline
        assert all(0.0 < v <= 1.0 for v in task.baseline.values()), (
            name,
            task.baseline,
        )
        assert task.few_shot_separator == "\n\n" and task.stop == ("\n",)
        assert repr(task).startswith(f"get_task({name!r}")


def test_get_task_errors_are_one_line_config_errors_with_did_you_mean():
    with pytest.raises(
        ConfigError, match=r"unknown task 'ad3' \(did you mean 'add3'\?\)"
    ):
        get_task("ad3")
    with pytest.raises(
        ConfigError,
        match=r"no parameter 'test_frac' \(did you mean 'test_fraction'\?\)",
    ):
        get_task("add3", test_frac=0.1)
    with pytest.raises(
        ConfigError, match=r"task 'facts': n_keys must be an integer in 1\.\.1296"
    ):
        get_task("facts", n_keys=5000)
    with pytest.raises(
        ValueError, match="test_fraction"
    ):  # ConfigError is a ValueError
        get_task("add2", test_fraction=1.0)
    with pytest.raises(ConfigError) as e:
        get_task(
            "facts", test_fraction=0.5
        )  # memorisation tasks have no split to choose
    assert "\n" not in str(e.value)


def test_params_record_every_parameter_so_the_task_can_be_rebuilt():
    task = get_task("facts", n_keys=10)
    assert task.params == {"n_keys": 10, "key_len": 2, "value_len": 8, "table_seed": 0}
    again = get_task(task.name, **task.params)
    assert again.test_items(10, 0) == task.test_items(10, 0)


# One of each family and form (the registry test above builds all of them).
FAMILIES = [
    "add1",
    "add3_reversed",
    "sub2",
    "mul2",
    "modadd",
    "copy",
    "recall",
    "facts",
    "unscramble",
    "larger",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_items_other_seed_other_items(name):
    task, other = (
        _build(name),
        _build(name),
    )  # a fresh object: no hidden state carries over
    test = task.test_items(8, seed=3)
    assert test == other.test_items(8, seed=3)
    assert task.train_items(8, seed=3) == other.train_items(8, seed=3)
    assert task.few_shot_prompt(test[0], 3, seed=1) == other.few_shot_prompt(
        test[0], 3, seed=1
    )
    assert list(task.pretraining_text(20, seed=2)) == list(
        other.pretraining_text(20, seed=2)
    )
    assert test != task.test_items(8, seed=4)
    assert len({it.text for it in test}) == len(test)  # distinct items


@pytest.mark.parametrize(
    "name, params",
    [
        ("add1", {}),
        ("add2", {}),
        ("sub1", {}),
        ("mul1", {}),
        ("larger", {"digits": 1}),
        ("modadd", {"modulus": 13}),
    ],
)
def test_train_and_test_are_disjoint_exhaustively_on_small_spaces(name, params):
    task = get_task(name, **params)
    every = task.all_items()
    test = task.test_items(
        10**6, seed=0
    )  # asks for more than there are: the whole split
    train = task.train_items(10**6, seed=0)
    test_keys, train_keys = {it.key for it in test}, {it.key for it in train}
    assert not test_keys & train_keys
    assert test_keys | train_keys == {it.key for it in every}
    assert (
        len(test) + len(train)
        == len(every)
        == task.split_size("test") + task.split_size("train")
    )
    assert test_keys and train_keys
    # the split is a property of the key alone, recomputable by anyone
    assert all(key_fraction(k) < task.test_fraction for k in test_keys)


def test_split_fraction_and_commutative_twins_share_a_split():
    task = get_task("add2")
    n_test, n_all = task.split_size("test"), len(task.all_items())
    assert 0.17 < n_test / n_all < 0.23  # test_fraction 0.2 of the keys
    test = set(task.test_items(10**6, seed=0))
    for it in test:
        a, b = map(int, re.findall(r"\d+", it.prompt))
        assert task.item(b, a) in test  # 76 + 48 is test when 48 + 76 is
    # a reversed variant splits identically, so mixing both into pre-training leaks nothing
    plain, rev = get_task("add2"), get_task("add2_reversed")
    assert {it.key for it in plain.test_items(10**6, 0)} == {
        it.key for it in rev.test_items(10**6, 0)
    }


@pytest.mark.parametrize("name", ["add3", "sub5_reversed", "copy", "recall"])
def test_large_spaces_are_sampled_but_still_disjoint(name):
    task = get_task(name)
    assert task.all_items() is None and task.split_size("test") is None
    test, train = task.test_items(300, seed=0), task.train_items(300, seed=0)
    assert len(test) == len(train) == 300
    assert all(task.in_test(it.key) and not task.in_train(it.key) for it in test)
    assert not {it.key for it in test} & {it.key for it in train}


@pytest.mark.parametrize("name", ["add1", "add3_reversed", "copy", "larger", "facts"])
def test_few_shot_demonstrations_are_train_items_never_the_query(name):
    task = get_task(name)
    queries = task.test_items(10**6 if name == "add1" else 40, seed=0)
    for item in queries:
        demos = task.few_shot_items(item, 4, seed=7)
        assert len(demos) == 4
        assert all(task.in_train(d.key) and d.key != item.key for d in demos)
        prompt = task.few_shot_prompt(item, 4, seed=7)
        assert prompt == "\n\n".join(
            [d.prompt + d.target for d in demos] + [item.prompt]
        )
        assert prompt.endswith(item.prompt) and prompt.count(item.prompt) == 1
        assert item.prompt + item.target not in prompt
    assert task.few_shot_prompt(queries[0], 0, seed=0) == queries[0].prompt


def test_few_shot_gpt3_format_by_hand():
    task = get_task("add2")
    item = task.item(48, 76)
    demo = task.few_shot_items(item, 1, seed=0)[0]
    a, b = re.findall(r"\d+", demo.prompt)
    assert (
        task.few_shot_prompt(item, 1, seed=0)
        == f"Q: What is {a} plus {b}?\nA: {int(a) + int(b)}\n\nQ: What is 48 plus 76?\nA: "
    )


def test_too_many_shots_for_a_small_train_split_is_an_error():
    task = get_task("add1")
    item = task.test_items(1, 0)[0]
    with pytest.raises(ValueError, match="shots"):
        task.few_shot_items(item, task.split_size("train") + 1, seed=0)


@pytest.mark.parametrize("name", ["add2", "add2_reversed", "larger", "modadd"])
def test_pretraining_text_holds_only_train_items(name):
    task = get_task(name)
    train = {it.text for it in task.train_items(10**6, 0)}
    test = {it.text for it in task.test_items(10**6, 0)}
    docs = list(task.pretraining_text(500, seed=1, items_per_document=16))
    assert len(docs) == 32  # 31 full documents and one of 4
    chunks = [c for d in docs for c in d.split("\n\n")]
    assert len(chunks) == 500
    assert all(c in train for c in chunks) and not any(c in test for c in chunks)
    # shuffled epochs: 500 draws from a pool of thousands repeat nothing
    assert len(set(chunks)) == 500


def test_pretraining_text_of_a_large_space_is_endless_and_train_only():
    task = get_task("add3_reversed")
    docs = list(
        itertools.islice(task.pretraining_text(None, seed=0, items_per_document=8), 50)
    )
    chunks = [c for d in docs for c in d.split("\n\n")]
    assert len(chunks) == 400
    for c in chunks:
        a, b = map(int, re.match(r"Q: What is (\d+) plus (\d+)\?\nA: \d+$", c).groups())
        assert task.in_train(task.item(a, b).key) and task.item(a, b).text == c


def test_item_checks_its_choices():
    Item(prompt="Q: ", target="b", key="k", choices=("a", "b"), answer_index=1)
    with pytest.raises(ValueError, match="is not the target"):
        Item(prompt="Q: ", target="b", key="k", choices=("a", "b"), answer_index=0)
    with pytest.raises(ValueError, match="answer_index"):
        Item(prompt="Q: ", target="b", key="k", choices=("a", "b"))
    with pytest.raises(ValueError, match="key"):
        Item(prompt="Q: ", target="b", key="")
    with pytest.raises(ValueError, match="seed"):
        get_task("add1").test_items(3, seed=-1)
