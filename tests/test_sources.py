"""Sources: the shipped corpora through TFDS (ArrayRecord, no TF, no network) and user files."""

import gzip
import logging
import re
import socket
import sys

import pytest
import tensorflow_datasets as tfds

from t5lite.data import sources
from t5lite.data.corpora import tfds_builders
from t5lite.errors import UserError

# Split sizes of the shipped files (build_corpora.py prints them); a rebuild that moves
# records between splits must fail here.
BIBLE_SPLITS = {'train': 29827, 'validation': 339, 'test': 308}
WORDNET_SPLITS = {'train': 202645, 'validation': 2091, 'test': 2218}


@pytest.fixture(scope='module')
def no_network():
    """Any socket connection attempt fails the test: building and reading must be offline."""
    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, 'connect', refuse)
        mp.setattr(socket, 'create_connection', refuse)
        yield


@pytest.fixture(scope='module')
def bible_dir(tmp_path_factory, no_network):
    """t5lite_bible built once (~2 s) into a scratch data_dir."""
    return tfds_builders.prepare_shipped(str(tmp_path_factory.mktemp('tfds')),
                                         names=('t5lite_bible',))


def test_shipped_bible_builds_to_array_record_and_loads_with_tfds(bible_dir):
    for split, size in BIBLE_SPLITS.items():
        ds = tfds.data_source('t5lite_bible', split=split, data_dir=bible_dir)
        assert len(ds) == size
    builder = tfds.builder_from_directory(f'{bible_dir}/t5lite_bible/1.0.0')
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert str(builder.info.version) == '1.0.0'
    assert 'tensorflow' not in sys.modules  # TFDS without TF throughout


def test_shipped_bible_fields_are_aligned(bible_dir):
    records = list(sources.shipped('bible', 'train', data_dir=bible_dir))
    by_id = {r['id']: r for r in records}
    gen = by_id['Gen.1.1']
    assert gen == {'id': 'Gen.1.1', 'book': 'Genesis', 'chapter': 1, 'verse': 1,
                   'en_web': 'In the beginning, God created the heavens and the earth.',
                   'es_rv1909': 'EN el principio crió Dios los cielos y la tierra.',
                   'en_kjv': 'In the beginning God created the heaven and the earth.'}
    john = by_id['John.3.16']
    assert john['en_kjv'].startswith('For God so loved the world')
    assert john['es_rv1909'].startswith('Porque de tal manera amó Dios al mundo')
    assert 'God so loved the world' in john['en_web']
    # No markup or footnotes survive; every text is present.
    for r in records[:2000]:
        for field in ('en_web', 'es_rv1909', 'en_kjv'):
            assert r[field] and '<' not in r[field] and '\\' not in r[field], r['id']


def test_shipped_splits_are_disjoint_and_stable(bible_dir):
    ids = {split: {r['id'] for r in sources.shipped('t5lite_bible', split, data_dir=bible_dir)}
           for split in BIBLE_SPLITS}
    assert not ids['train'] & ids['validation'] and not ids['train'] & ids['test']
    assert not ids['validation'] & ids['test']
    assert {len(v) for v in ids.values()} == set(BIBLE_SPLITS.values())


def test_tfds_source_is_a_grain_source(bible_dir):
    import grain
    src = sources.TfdsSource('t5lite_bible', 'validation[:10]', data_dir=bible_dir)
    assert len(src) == 10
    ds = grain.MapDataset.source(src).shuffle(seed=0)
    assert sorted(r['id'] for r in ds) == sorted(src[i]['id'] for i in range(10))
    assert src.__getitems__([0, 1]) == [src[0], src[1]]


def test_prepare_shipped_is_idempotent_and_honours_env(bible_dir, monkeypatch):
    monkeypatch.setenv('T5LITE_DATA_DIR', bible_dir)
    assert tfds_builders.default_data_dir() == bible_dir
    assert tfds_builders.prepare_shipped(names=('t5lite_bible',)) == bible_dir  # no rebuild
    assert len(sources.shipped('bible', 'test')) == BIBLE_SPLITS['test']


def test_tfds_source_errors_name_the_fix(bible_dir, tmp_path):
    with pytest.raises(UserError, match=r"unknown.*use one of: train, validation, test"):
        sources.TfdsSource('t5lite_bible', 'dev', data_dir=bible_dir)
    with pytest.raises(UserError, match=r"selects nothing"):
        sources.TfdsSource('t5lite_bible', 'train[:0]', data_dir=bible_dir)
    with pytest.raises(UserError, match=r"not found in .*tfds build no_such_set "
                                        r"--file_format=array_record"):
        sources.TfdsSource('no_such_set', 'train', data_dir=str(tmp_path))
    with pytest.raises(UserError, match=r"no shipped corpus 'poems': use one of bible, wordnet"):
        sources.shipped('poems', 'train')


@pytest.mark.slow
def test_real_shipped_build_of_both_corpora(tmp_path, no_network):
    """The full build (~15 s, WordNet is 207k records) with exact split sizes."""
    data_dir = tfds_builders.prepare_shipped(str(tmp_path))
    for name, splits in (('t5lite_bible', BIBLE_SPLITS), ('t5lite_wordnet', WORDNET_SPLITS)):
        for split, size in splits.items():
            assert len(tfds.data_source(name, split=split, data_dir=data_dir)) == size
    words, dog = {}, []
    for split in WORDNET_SPLITS:
        records = list(sources.shipped('wordnet', split, data_dir))
        words[split] = {r['word'].lower() for r in records}
        dog += [r for r in records if r['word'] == 'dog' and r['pos'] == 'noun']
    assert not words['train'] & words['test'] and not words['train'] & words['validation']
    assert any('genus Canis' in r['definition'] for r in dog)
    assert any('the dog barked all night' in r['examples'] for r in dog)


# ---------------------------------------------------------------------------------------------
# User files


def write(path, text, gz=False):
    data = text.encode('utf-8') if isinstance(text, str) else text
    (gzip.open if gz else open)(path, 'wb').write(data)
    return str(path)


def test_tsv_source_reads_files_in_sorted_order(tmp_path):
    write(tmp_path / 'b.tsv', 'three\t3\n')
    write(tmp_path / 'a.tsv', 'one\t1\n\ntwo\t2\r\n')  # blank lines skipped, CRLF stripped
    src = sources.TsvSource(str(tmp_path / '*.tsv'))
    assert [src[i] for i in range(len(src))] == [
        {'inputs': 'one', 'targets': '1'}, {'inputs': 'two', 'targets': '2'},
        {'inputs': 'three', 'targets': '3'}]
    custom = sources.TsvSource(str(tmp_path / 'b.tsv'), fields=('question', 'answer'))
    assert custom[0] == {'question': 'three', 'answer': '3'}


def test_tsv_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / 'x.tsv', 'ok\t1\nno tab here\nok\t2\ttoo many\n')
    with pytest.raises(UserError, match=rf'{re.escape(path)}:2: malformed TSV line: expected 2 '
                                        r'tab-separated fields \(inputs, targets\), found 1; '
                                        r'fix it or pass skip_malformed=True'):
        sources.TsvSource(path)


def test_skip_malformed_counts_and_warns(tmp_path, caplog):
    path = write(tmp_path / 'x.tsv', 'ok\t1\nno tab here\nok\t2\ttoo many\nfine\t3\n')
    with caplog.at_level(logging.WARNING):
        src = sources.TsvSource(path, skip_malformed=True)
    assert len(src) == 2 and src.skipped == 2
    assert f'skipped 2 malformed line(s), first at {path}:2' in caplog.text


def test_jsonl_source(tmp_path):
    write(tmp_path / 'd.jsonl.gz', '{"inputs": "a", "targets": "b", "extra": 1}\n', gz=True)
    assert sources.JsonlSource(str(tmp_path / 'd.jsonl.gz'))[0] == {
        'inputs': 'a', 'targets': 'b', 'extra': 1}
    assert sources.JsonlSource(str(tmp_path / '*.gz'), fields=('inputs',))[0] == {'inputs': 'a'}
    bad = write(tmp_path / 'bad.jsonl', '{"inputs": "a"}\n{"inputs": \n[1, 2]\n{"other": 1}\n')
    with pytest.raises(UserError, match=rf'{re.escape(bad)}:2: malformed JSONL line: invalid'):
        sources.JsonlSource(bad)
    src = sources.JsonlSource(bad, fields=('inputs',), skip_malformed=True)
    assert len(src) == 1 and src.skipped == 3  # bad JSON, not an object, missing field
    with pytest.raises(UserError, match=rf'{re.escape(bad)}:4: .*missing field\(s\) inputs'):
        sources.JsonlSource(write(tmp_path / 'bad.jsonl', '{"inputs": 1}\n' * 3 +
                                  '{"other": 1}\n'), fields=('inputs',))


def test_text_line_source_and_bad_utf8(tmp_path):
    path = write(tmp_path / 't.txt', 'first line\n\n  second line \n')
    src = sources.TextLineSource(path)
    assert [src[0], src[1]] == [{'text': 'first line'}, {'text': '  second line '}]
    bad = write(tmp_path / 'b.txt', b'good\n\xff\xfe bad\n')
    with pytest.raises(UserError, match=rf'{re.escape(bad)}:2: malformed text line: not UTF-8'):
        sources.TextLineSource(bad)
    assert len(sources.TextLineSource(bad, skip_malformed=True)) == 1


def test_records_are_copies(tmp_path):
    src = sources.TsvSource(write(tmp_path / 'x.tsv', 'a\tb\n'))
    src[0]['inputs'] = 'changed'
    assert src[0]['inputs'] == 'a'


def test_missing_files_name_the_pattern(tmp_path):
    missing = str(tmp_path / 'nothing-*.tsv')
    with pytest.raises(UserError, match=rf"no file matches '{re.escape(missing)}': check the"):
        sources.TsvSource(missing)
    with pytest.raises(UserError, match=r"no file matches"):
        sources.JsonlSource([write(tmp_path / 'a.jsonl', '{}\n'), str(tmp_path / 'b.jsonl')])
    empty = write(tmp_path / 'empty.txt', '\n\n')
    with pytest.raises(UserError, match=r"hold no records"):
        sources.TextLineSource(empty)
