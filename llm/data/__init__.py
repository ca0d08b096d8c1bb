"""Data: sources -> tokenizer -> cached token files -> pure batch sampling.

Public face: ``load_dataset(data_cfg, *, vocab_size, seq_len, eval_tokens, progress)``
returning a ``TokenDataset``. Sources: ``builtin:<kjv|gcide|english>``,
``text:<path or glob>``, ``tfds:<name>[/<config>]``, ``synthetic:markov``.
"""

from llm.data.dataset import TokenDataset, load_dataset

__all__ = ["TokenDataset", "load_dataset"]
