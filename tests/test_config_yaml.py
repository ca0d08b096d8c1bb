"""The strict YAML loader shared by run configs and sweep specs: alias bombs, odd files, flatten."""

from __future__ import annotations

import pytest

from llm.config import ConfigError, load_config
from llm.typed_yaml import MAX_ALIAS_NODES, deep_copy, flatten
from sweeps.spec import load_spec


def _billion_laughs(depth: int) -> str:
    """Level i is a list of nine aliases of level i-1: 9**(depth+1) strings once expanded."""
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, depth + 1):
        lines.append(f"lol{i}: &lol{i} [" + ", ".join([f"*lol{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_config_is_refused_before_expansion(tmp_path):
    # Depth 9 is ~4e9 nodes: before, the loader expanded it (MemoryError after 74 s).
    path = tmp_path / "bomb.yaml"
    path.write_text(_billion_laughs(9))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "aliases" in message and f"{MAX_ALIAS_NODES:,}" in message
    assert "\n" not in message


def test_billion_laughs_spec_and_override_are_refused(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_billion_laughs(9))
    with pytest.raises(ConfigError, match="bomb.yaml: YAML aliases"):
        load_spec(path)
    flow = "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)
    ) + "]"
    with pytest.raises(ConfigError, match="override model.d_model: YAML aliases"):
        load_config(None, [f"model.d_model={flow}"])


def test_merge_key_bomb_is_refused(tmp_path):
    # `<<: [*a, *a, ...]` copies key/value nodes at each level: the same blow-up by another road.
    lines = ["a0: &a0 {x: 1, y: 2}"]
    lines += [f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}" for i in range(1, 10)]
    path = tmp_path / "merge.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="YAML aliases"):
        load_config(path)


def test_small_bomb_below_the_limit_reaches_the_key_check(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(_billion_laughs(3))  # 9**4 = 6561 strings: a legal (if silly) document
    with pytest.raises(ConfigError, match="unknown config key 'lol0'"):
        load_config(path)


def test_ordinary_anchors_and_aliases_still_load(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        "base:\n"
        "  model: &shape {d_model: 64, n_layers: 2, n_heads: 4, d_ff: 128, seq_len: 32}\n"
        "  optim: {lr: 1.0e-3, <<: &adam {b1: 0.9, b2: 0.99}}\n"
        "  train: {steps: 3, tokens: null, batch_size: 2}\n"
        "grid: {train.seed: &seeds [0, 1], data.seed: *seeds}\n"
    )
    spec = load_spec(path)
    assert spec.base["model"]["d_model"] == 64 and spec.base["optim"]["b2"] == 0.99
    assert dict(spec.grid) == {"train.seed": [0, 1], "data.seed": [0, 1]}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a: &a [1, *a]\n", "recursive alias"),
        ("x: " + "[" * 800 + "]" * 800 + "\n", "YAML nested too deeply"),
        ("model: {d_model: 64\n", "not valid YAML at line 2"),
    ],
)
def test_malformed_yaml_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_non_utf8_file_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: {d_model: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="c.yaml: not UTF-8 text"):
        load_config(path)


def test_flatten_joins_with_the_given_separator():
    nested = {"step": 3, "moe": {"layer0": {"drop": 0.5}}, "optim.lr": [1, 2]}
    assert flatten(nested) == {"step": 3, "moe.layer0.drop": 0.5, "optim.lr": [1, 2]}
    assert flatten(nested, sep="/") == {"step": 3, "moe/layer0/drop": 0.5, "optim.lr": [1, 2]}


def test_deep_copy_shares_no_containers():
    shared = [1, 2]
    data = {"a": shared, "b": {"c": shared}, "t": (1, 2)}
    copy = deep_copy(data)
    assert copy == {"a": [1, 2], "b": {"c": [1, 2]}, "t": [1, 2]}
    copy["b"]["c"].append(3)
    assert shared == [1, 2] and copy["a"] == [1, 2]


def test_one_loader_shared_by_llm_and_sweeps():
    import llm.config
    import llm.metrics
    import llm.typed_yaml
    import sweeps.plan
    import sweeps.spec

    assert llm.config.ConfigError is llm.typed_yaml.ConfigError
    assert sweeps.spec.from_dict is llm.typed_yaml.from_dict and sweeps.spec.read_yaml is llm.typed_yaml.read_yaml
    for module in (llm.config, llm.metrics, sweeps.plan, sweeps.spec):
        assert not any(hasattr(module, n) for n in ("_deep_copy", "_flatten", "_did_you_mean", "_coerce")), module
