"""Generated tasks for few-shot evaluation and for mixing into pre-training (issue 10).

Pure Python and numpy, seeded, no downloads. ``get_task(name, **params)`` builds a
``Task``; a task draws ``Item``s (prompt, target, canonical key, optional
choices) with train and test disjoint by construction (a hash of the key), and
states its random baseline per metric::

    task = get_task("add3_reversed")
    for item in task.test_items(500, seed=0):
        context = task.few_shot_prompt(item, shots=4, seed=0)  # score item.target after it
    docs = task.pretraining_text(None, seed=1)                  # endless train-only documents

Names: ``add1``..``add5``, ``sub1``..``sub5``, ``mul1``, ``mul2`` (each also
``_reversed``), ``modadd``, ``copy``, ``recall``, ``facts``, ``unscramble``, ``larger``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from llm.tasks.arithmetic import Arithmetic, ModularAddition
from llm.tasks.base import (
    BRIER,
    EXACT_MATCH,
    MULTIPLE_CHOICE_ACCURACY,
    PER_TOKEN_ACCURACY,
    Item,
    Task,
    key_fraction,
)
from llm.tasks.choice import Larger
from llm.tasks.facts import Facts
from llm.tasks.recall import AssociativeRecall, Copying
from llm.tasks.unscramble import Unscramble, corpus_words
from llm.typed_yaml import ConfigError
from rundir import did_you_mean

__all__ = [
    "BRIER",
    "EXACT_MATCH",
    "MULTIPLE_CHOICE_ACCURACY",
    "PER_TOKEN_ACCURACY",
    "TASKS",
    "ConfigError",
    "check_task_params",
    "Item",
    "Task",
    "corpus_words",
    "get_task",
    "key_fraction",
]


def _arithmetic(op: str, digits: int, reversed_digits: bool) -> Callable[..., Task]:
    def make(*, test_fraction: float = 0.2) -> Task:
        return Arithmetic(
            op, digits, reversed_digits=reversed_digits, test_fraction=test_fraction
        )

    return make


TASKS: dict[str, Callable[..., Task]] = {}
for _op, _short, _ks in (
    ("plus", "add", range(1, 6)),
    ("minus", "sub", range(1, 6)),
    ("times", "mul", range(1, 3)),
):
    for _k in _ks:
        TASKS[f"{_short}{_k}"] = _arithmetic(_op, _k, False)
        TASKS[f"{_short}{_k}_reversed"] = _arithmetic(_op, _k, True)
TASKS.update(
    modadd=ModularAddition,
    copy=Copying,
    recall=AssociativeRecall,
    facts=Facts,
    unscramble=Unscramble,
    larger=Larger,
)


def get_task(name: str, **params) -> Task:
    """The task registered as ``name``, built with ``params`` (e.g. ``get_task("facts", n_keys=768)``).

    Unknown names and parameters, and bad values, raise ``ConfigError`` (a
    ``ValueError``) with a one-line message naming them. ``task.params`` records
    every parameter, defaults included, so the task can be rebuilt exactly.
    """
    if name not in TASKS:
        raise ConfigError(
            f"unknown task {name!r}{did_you_mean(name, list(TASKS))}; choose one of {', '.join(TASKS)}"
        )
    factory = TASKS[name]
    signature = inspect.signature(factory)
    allowed = [p for p in signature.parameters if p != "self"]
    for key in params:
        if key not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise ConfigError(
                f"task {name!r} has no parameter {key!r}{did_you_mean(key, allowed)}; it takes {takes}"
            )
    bound = signature.bind(**params)
    bound.apply_defaults()
    try:
        task = factory(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"task {name!r}: {e}") from None
    assert task.name == name, (task.name, name)
    task.params = dict(bound.arguments)
    return task


def check_task_params(params, names, where: str = "task params") -> dict[str, dict]:
    """``params`` ({task: {parameter: value}}) as plain dicts, checked against the tasks ``names``.

    ConfigError (one line, naming ``where``) when params is not such a mapping, names a task that
    is not in ``names``, or a task rejects a parameter or value (``get_task`` builds each one).
    """
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: expected a mapping of task name to parameters such as "
                          f"{{facts: {{n_keys: 512}}}}, got {params!r}")  # fmt: skip
    out = {}
    for name, task_params in params.items():
        if name not in names:
            raise ConfigError(f"{where}: {name!r} is not among the tasks evaluated "
                              f"({', '.join(map(str, names))}){did_you_mean(str(name), list(names))}")  # fmt: skip
        if not isinstance(task_params, dict):
            raise ConfigError(f"{where}: {name}: expected a mapping of parameter to value, got {task_params!r}")
        try:
            get_task(name, **task_params)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        out[str(name)] = dict(task_params)
    return out
