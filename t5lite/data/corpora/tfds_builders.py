"""TFDS builders for the shipped corpora, so they load exactly like any TFDS dataset.

`t5lite_bible` (WEB / RV1909 / KJV verses aligned by reference) and `t5lite_wordnet` (WordNet 3.0
word senses) are generated from the .jsonl.gz files next to this module into ArrayRecord files,
then read with `tfds.data_source(name, split=..., data_dir=...)`: random access, no TensorFlow,
no network. `prepare_shipped()` builds both once per data_dir; importing this module registers
the two names with TFDS.
"""

import gzip
import json
import os

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from t5lite.errors import UserError
from t5lite.fileio import nearest_existing

CORPORA_DIR = os.path.dirname(os.path.abspath(__file__))
SPLITS = ('train', 'validation', 'test')
DEFAULT_DATA_DIR = '~/.cache/t5lite/tfds'


def default_data_dir() -> str:
    """$T5LITE_DATA_DIR if set, else ~/.cache/t5lite/tfds."""
    return os.path.expanduser(os.environ.get('T5LITE_DATA_DIR') or DEFAULT_DATA_DIR)


def _check_data_dir(data_dir: str, building: bool) -> None:
    """The data directory is a directory (or can be made one) and, when a corpus must be built
    there, writable: one line naming T5LITE_DATA_DIR instead of a TFDS traceback."""
    path = os.path.abspath(data_dir)
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise UserError(f'the data directory {path} (T5LITE_DATA_DIR) cannot be used: {existing} is a file, not a '
                        'directory; set T5LITE_DATA_DIR to a directory')
    if building and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'the shipped corpora must be built once into {path} (T5LITE_DATA_DIR), but {existing} is '
                        'not writable; set T5LITE_DATA_DIR to a writable directory')


def read_jsonl_gz(filename: str) -> list[dict]:
    """All records of one shipped file, in file order."""
    with gzip.open(os.path.join(CORPORA_DIR, filename), 'rt', encoding='utf-8') as f:
        return [json.loads(line) for line in f]


class _ShippedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common part: one shipped .jsonl.gz whose records carry their split name."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'First release, built from the files shipped with t5lite.'}
    FILENAME = ''  # the .jsonl.gz next to this module
    DESCRIPTION = ''
    HOMEPAGE = ''
    LICENSE = 'See t5lite/data/corpora/LICENSE.md.'

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. TFDS 4.9.10's own lookup needs `importlib_resources`, which etils no longer
        installs (ModuleNotFoundError on download_and_prepare): skip it."""
        return epath.Path(__file__)

    def _features(self) -> dict:
        raise NotImplementedError

    def _example(self, record: dict) -> tuple[str, dict]:
        """(unique key, features) for one file record."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=self, ...), not dataset_info_from_configs: this class lives
        # outside a TFDS package directory (see docs/stack-notes.md).
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
            license=self.LICENSE, features=tfds.features.FeaturesDict(self._features()))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data ships with the code
        records = read_jsonl_gz(self.FILENAME)
        return {split: self._generate_examples(records, split) for split in SPLITS}

    def _generate_examples(self, records, split):
        for record in records:
            if record['split'] == split:
                yield self._example(record)


class T5liteBible(_ShippedBuilder):
    """Bible verses in three public-domain translations, aligned by (book, chapter, verse)."""

    name = 't5lite_bible'
    FILENAME = 'bible.jsonl.gz'
    DESCRIPTION = ('World English Bible, Reina-Valera 1909 (Spanish) and King James Version, '
                   'aligned verse by verse (KJV numbering); id like "Gen.1.1".')
    HOMEPAGE = 'https://ebible.org/'

    def _features(self):
        text, int32 = tfds.features.Text(), tfds.features.Scalar(dtype=np.int32)
        return {'id': text, 'book': text, 'chapter': int32, 'verse': int32,
                'en_web': text, 'es_rv1909': text, 'en_kjv': text}

    def _example(self, record):
        return record['id'], {k: record[k] for k in self._features()}


class T5liteWordnet(_ShippedBuilder):
    """WordNet 3.0 word senses: (word, pos, definition, examples); splits never share a word."""

    name = 't5lite_wordnet'
    FILENAME = 'wordnet.jsonl.gz'
    DESCRIPTION = ('WordNet 3.0 word senses: word (underscores as spaces), pos in '
                   '{noun, verb, adj, adv}, definition and usage examples.')
    HOMEPAGE = 'https://wordnet.princeton.edu/'

    def _features(self):
        text = tfds.features.Text()
        return {'word': text, 'pos': text, 'definition': text,
                'examples': tfds.features.Sequence(text)}

    def _example(self, record):
        key = f'{record["word"]}|{record["pos"]}|{record["definition"]}'  # unique by construction
        return key, {k: record[k] for k in self._features()}


BUILDERS = {cls.name: cls for cls in (T5liteBible, T5liteWordnet)}


def prepare_shipped(data_dir: str | None = None, names=tuple(BUILDERS)) -> str:
    """Build the shipped datasets into data_dir as ArrayRecord (once; later calls only check).

    Returns data_dir, ready for `tfds.data_source(name, split=..., data_dir=data_dir)`.
    Takes ~2 s for the bible and ~13 s for WordNet on one CPU core; later calls ~1 ms.
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    _check_data_dir(data_dir, building=False)
    for name in names:
        builder = BUILDERS[name](data_dir=data_dir, file_format='array_record')
        if builder.is_prepared():
            continue
        _check_data_dir(data_dir, building=True)
        try:
            builder.download_and_prepare(  # no GCS lookups: everything is local
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except FileExistsError:  # another process (host, test worker) finished first: fine
            if not BUILDERS[name](data_dir=data_dir, file_format='array_record').is_prepared():
                raise
    return data_dir
