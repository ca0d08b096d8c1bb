"""A TFDS dataset builder for local text files, stored as array_record (no TensorFlow needed).

``chinchax_text`` turns the UTF-8 files of ``manual_dir`` into one example per
document (``{"text": ...}``), documents being the blank-line separated blocks of
``llm.data.text_files``. Prepared with ``file_format="array_record"`` it reads back
through ``tfds.data_source`` without TensorFlow. Imported only for ``tfds:`` sources.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from llm.data.text_files import _blocks, _read, visible_files

NAME = "chinchax_text"


class ChinchaxText(tfds.core.GeneratorBasedBuilder):
    """Local UTF-8 text files from ``manual_dir`` (all files below it), one example per document."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put UTF-8 text files in manual_dir (data.tfds_manual_dir)."

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 probes the optional importlib_resources package for builders that
        # live in a package; this file's plain path is what it would find.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local UTF-8 text files, one example per blank-line separated document.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        files = visible_files(root)
        return {"train": self._generate_examples(root, files)}

    def _generate_examples(self, root: Path, files):
        for path in files:
            for i, block in enumerate(_blocks(_read(path))):
                yield f"{path.relative_to(root)}#{i}", {"text": block}


def prepare_local_text(manual_dir: str, data_dir: str, config_name: str, progress: bool = True) -> None:
    """Prepare ``chinchax_text/<config_name>`` from ``manual_dir`` into ``data_dir`` (array_record)."""
    builder = ChinchaxText(data_dir=data_dir, config=tfds.core.BuilderConfig(name=config_name))
    if not progress:
        tfds.disable_progress_bar()
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints its progress; keep stdout clean
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False),
            file_format="array_record",
        )
