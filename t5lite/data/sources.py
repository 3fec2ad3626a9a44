"""Data sources: random-access sequences of dict records (`len` + `__getitem__`).

Each one is what `grain.MapDataset.source(...)` takes, so shuffling, sharding and checkpointing
the read position stay with grain. Sources:

- `TfdsSource(name, split, data_dir)`: any TFDS dataset built as ArrayRecord, read without TF.
- `shipped(name, split)`: the corpora that ship with t5lite (bible, wordnet), built on first use.
- `TsvSource`, `JsonlSource`, `TextLineSource`: the user's files, by path or glob, loaded eagerly.

Text comes back as `str`, integers as `int`, sequences as lists.
"""

import glob
import gzip
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from t5lite.data.corpora import tfds_builders
from t5lite.errors import UserError

SHIPPED = {'bible': 't5lite_bible', 'wordnet': 't5lite_wordnet'}  # short name -> TFDS name


def decode(value):
    """TFDS values -> plain Python: bytes -> str, numpy scalars -> int/float, arrays -> lists."""
    if isinstance(value, bytes):
        return value.decode('utf-8')
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [decode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# TFDS (ArrayRecord)


class TfdsSource:
    """One split of a TFDS dataset prepared in ArrayRecord format, read by random access.

    name: 'dataset', 'dataset:1.0.0' or 'dataset/config'. split: 'train', 'validation[:10%]', ...
    data_dir: a local path or a bucket path (gs://bucket/tfds: needs `gcsfs` and credentials);
    None means TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets), except for the shipped
    corpora, whose default is $T5LITE_DATA_DIR or ~/.cache/t5lite/tfds and which are built there
    on first use. Nothing is ever downloaded.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        self.name, self.split = name, split
        base = name.split(':')[0].split('/')[0]
        if base in tfds_builders.BUILDERS:
            data_dir = tfds_builders.prepare_shipped(data_dir, names=(base,))
        where = data_dir or 'the TFDS default data_dir'
        build = (f'build it once with `tfds build {base} --file_format=array_record'
                 f'{f" --data_dir={data_dir}" if data_dir else ""}`, or pass the data_dir holding it')
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise UserError(f'TFDS dataset {name!r} not found in {where}: {build}') from None
        if not builder.is_prepared():
            raise UserError(f'TFDS dataset {name!r} is not prepared in {where}: {build}')
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise UserError(f'TFDS dataset {name!r} in {where} is {builder.info.file_format.value}, '
                            f'not array_record (random access, no TF): rebuild it with '
                            f'`tfds build {base} --file_format=array_record`')
        try:
            self._source = builder.as_data_source(split=split)
        except (ValueError, KeyError) as e:
            splits = ', '.join(builder.info.splits)
            raise UserError(f'split {split!r} of TFDS dataset {name!r} is unknown or selects '
                            f'nothing ({str(e).splitlines()[0]}); use one of: {splits}') from None
        if len(self._source) == 0:
            raise UserError(f'split {split!r} of TFDS dataset {name!r} is empty: choose another '
                            f'split or slice (available: {", ".join(builder.info.splits)})')
        self.data_dir = data_dir

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        n = len(self._source)
        if not -n <= index < n:
            raise IndexError(f'record {index} out of range for {n} records')
        return decode(self._source[index % n])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Batched reads (grain uses this when present): one ArrayRecord call for many records."""
        return [decode(r) for r in self._source.__getitems__(list(indices))]

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self.__getitems__(range(start, min(start + 1024, len(self))))

    def __repr__(self) -> str:
        return f'TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)'


def shipped(name: str, split: str, data_dir: str | None = None) -> TfdsSource:
    """A shipped corpus ('bible' or 'wordnet', or its TFDS name) as a TfdsSource.

    bible records: id, book, chapter, verse, en_web, es_rv1909, en_kjv.
    wordnet records: word, pos, definition, examples (list of str).
    """
    tfds_name = SHIPPED.get(name, name)
    if tfds_name not in tfds_builders.BUILDERS:
        raise UserError(f'no shipped corpus {name!r}: use one of {", ".join(SHIPPED)}')
    return TfdsSource(tfds_name, split, data_dir)


# ---------------------------------------------------------------------------------------------
# The user's files: TSV, JSON lines, plain text. Plain or .gz; sorted glob order; eager load.


def expand(pattern: str | Sequence[str]) -> list[str]:
    """Sorted files matching a path or glob (or several); UserError when nothing matches."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    paths = []
    for p in patterns:
        matches = sorted(f for f in glob.glob(os.path.expanduser(os.fspath(p)))
                         if os.path.isfile(f))
        if not matches:
            raise UserError(f'no file matches {os.fspath(p)!r}: check the path or glob '
                            f'(e.g. data/train-*.tsv), relative to {os.getcwd()}')
        paths.extend(matches)
    return paths


class _FileSource:
    """Records parsed line by line from files; malformed lines raise or are skipped and counted."""

    KIND = ''  # for messages: 'TSV', 'JSONL', 'text'

    def __init__(self, pattern, skip_malformed: bool = False):
        self.pattern, self.paths = pattern, expand(pattern)
        self._records, skipped, first_bad = [], 0, None
        for path in self.paths:
            opener = gzip.open if path.endswith('.gz') else open
            with opener(path, 'rb') as f:
                for line_no, raw in enumerate(f, start=1):
                    try:
                        line = raw.decode('utf-8').rstrip('\r\n')
                        record = self.parse(line) if line.strip() else None
                    except (UnicodeDecodeError, ValueError) as e:
                        problem = 'not UTF-8' if isinstance(e, UnicodeDecodeError) else str(e)
                        if not skip_malformed:
                            raise UserError(f'{path}:{line_no}: malformed {self.KIND} line: '
                                            f'{problem}; fix it or pass skip_malformed=True'
                                            ) from None
                        skipped, first_bad = skipped + 1, first_bad or f'{path}:{line_no}'
                        continue
                    if record is not None:
                        self._records.append(record)
        if skipped:
            logging.warning('%s %r: skipped %d malformed line(s), first at %s; kept %d records',
                            self.KIND, pattern, skipped, first_bad, len(self._records))
        self.skipped = skipped
        if not self._records:
            raise UserError(f'{self.KIND} files {pattern!r} hold no records: check the files')

    def parse(self, line: str) -> dict:
        """One non-blank line -> record; ValueError (message says what is wrong) if malformed."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return dict(self._records[index])  # a copy: map functions may mutate their input

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.pattern!r}, {len(self)} records)'


class TsvSource(_FileSource):
    """Tab-separated lines, one record each: exactly len(fields) columns, named by `fields`."""

    KIND = 'TSV'

    def __init__(self, pattern, fields: Sequence[str] = ('inputs', 'targets'),
                 skip_malformed: bool = False):
        self.fields = tuple(fields)
        super().__init__(pattern, skip_malformed)

    def parse(self, line):
        columns = line.split('\t')
        if len(columns) != len(self.fields):
            raise ValueError(f'expected {len(self.fields)} tab-separated fields '
                             f'({", ".join(self.fields)}), found {len(columns)}')
        return dict(zip(self.fields, columns))


class JsonlSource(_FileSource):
    """One JSON object per line. With `fields`, each must have them and only they are kept."""

    KIND = 'JSONL'

    def __init__(self, pattern, fields: Sequence[str] | None = None,
                 skip_malformed: bool = False):
        self.fields = tuple(fields) if fields is not None else None
        super().__init__(pattern, skip_malformed)

    def parse(self, line):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f'invalid JSON ({e.msg} at column {e.colno})') from None
        if not isinstance(obj, dict):
            raise ValueError(f'expected a JSON object, found {type(obj).__name__}')
        if self.fields is None:
            return obj
        missing = [f for f in self.fields if f not in obj]
        if missing:
            raise ValueError(f'missing field(s) {", ".join(missing)}')
        return {f: obj[f] for f in self.fields}


class TextLineSource(_FileSource):
    """Each non-blank line is a record {field: line} (for span corruption / LM pretraining)."""

    KIND = 'text'

    def __init__(self, pattern, field: str = 'text', skip_malformed: bool = False):
        self.field = field
        super().__init__(pattern, skip_malformed)

    def parse(self, line):
        return {self.field: line}
