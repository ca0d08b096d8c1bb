"""chinchax.llm: the model, data, training loop and parameter/FLOP counters.

Public face (all that ``sweeps`` may call): ``train(config, run_dir) -> RunResult``,
``evaluate(...)``, the config dataclasses in ``llm.config`` and the counters in
``llm.counting``. ``llm`` never imports ``sweeps`` or ``analysis``.
"""

from llm.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "train", "evaluate", "RunResult"]


def __getattr__(name: str):
    # Lazy so that `import llm.config` does not pay for importing jax/flax.
    if name in ("train", "evaluate", "RunResult"):
        from llm import training

        return getattr(training, name)
    raise AttributeError(name)
