"""llm.tasks arithmetic: GPT-3 format by hand, answers recomputed, reversed digits, baselines."""

import re

import pytest

from llm.tasks import get_task
from llm.tasks.arithmetic import operand_range, write_number

PATTERN = re.compile(r"Q: What is (\d+) (plus|minus|times) (\d+)\?\nA: $")
OPS = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
}


def test_gpt3_format_by_hand():
    assert get_task("add2").item(48, 76).text == "Q: What is 48 plus 76?\nA: 124"
    assert (
        get_task("add2").item(48, 76).prompt == "Q: What is 48 plus 76?\nA: "
    )  # target has no leading space
    assert get_task("sub2").item(48, 76).text == "Q: What is 48 minus 76?\nA: -28"
    assert get_task("mul2").item(12, 34).text == "Q: What is 12 times 34?\nA: 408"
    assert (
        get_task("modadd").item(48, 76).text == "Q: What is 48 plus 76 mod 97?\nA: 27"
    )
    assert get_task("add1").item(0, 7).text == "Q: What is 0 plus 7?\nA: 7"


def test_reversed_digits_lee_et_al():
    assert (
        get_task("add3_reversed").item(48 + 100, 76 + 100).target == "423"
    )  # 324 reversed
    assert get_task("add2_reversed").item(48, 76).target == "421"  # 124 reversed
    assert (
        get_task("add3_reversed").item(425, 875).target == "0031"
    )  # 1300: leading zeros are written
    assert get_task("sub2_reversed").item(48, 76).target == "-82"  # sign stays in front
    assert get_task("mul2_reversed").item(12, 34).target == "804"
    assert write_number(-120, True) == "-021" and write_number(0, True) == "0"
    assert get_task("add3_reversed").name == "add3_reversed"
    assert "reversed" in get_task("add3_reversed").description


@pytest.mark.parametrize(
    "name",
    [
        f"{op}{k}{rev}"
        for op in ("add", "sub")
        for k in range(1, 6)
        for rev in ("", "_reversed")
    ]
    + ["mul1", "mul2", "mul2_reversed"],
)
def test_answers_recomputed_from_the_prompt(name):
    task = get_task(name)
    k = int(name[3])
    lo, hi = operand_range(k)
    for item in task.test_items(40, seed=0) + task.train_items(40, seed=0):
        a, op, b = PATTERN.match(item.prompt).groups()
        assert (
            all(len(x) == k for x in (a, b))
            and lo <= int(a) <= hi
            and lo <= int(b) <= hi
        )
        want = OPS[op](int(a), int(b))
        got = item.target
        if name.endswith("_reversed"):
            got = got[0] + got[1:][::-1] if got.startswith("-") else got[::-1]
        assert int(got) == want, (item, want)
        assert set(item.target) <= set(task.answer_alphabet)


def test_operand_ranges_have_exactly_k_digits():
    assert (
        operand_range(1) == (0, 9)
        and operand_range(2) == (10, 99)
        and operand_range(5) == (10000, 99999)
    )
    assert (
        len(get_task("add1").all_items()) == 100
        and len(get_task("add2").all_items()) == 8100
    )


def test_modular_addition_answers():
    task = get_task("modadd", modulus=13)
    for item in task.test_items(10**6, seed=0):
        a, b, m = map(
            int,
            re.match(
                r"Q: What is (\d+) plus (\d+) mod (\d+)\?\nA: $", item.prompt
            ).groups(),
        )
        assert m == 13 and int(item.target) == (a + b) % 13
    assert task.baseline == {"exact_match": 1 / 13, "token_accuracy": 0.1}
    assert (
        get_task("modadd", modulus=5).baseline["token_accuracy"] == 1 / 5
    )  # answers use digits 0-4


def test_baselines():
    # digits: 1/10 per token; a uniform guess among the possible sums 0..18 for one digit
    assert get_task("add1").baseline == {"exact_match": 1 / 19, "token_accuracy": 0.1}
    assert get_task("add2_reversed").baseline == {
        "exact_match": 1 / (198 - 20 + 1),
        "token_accuracy": 0.1,
    }
    # differences can be negative: '-' joins the answer alphabet
    assert get_task("sub1").baseline == {
        "exact_match": 1 / 19,
        "token_accuracy": 1 / 11,
    }
    assert get_task("mul2").baseline["exact_match"] == 1 / (99 * 99 - 100 + 1)
