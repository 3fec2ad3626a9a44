"""Build the shipped corpora: `bible.jsonl.gz` and `wordnet.jsonl.gz` in this directory.

Run once by a developer, never at run time (the outputs are committed). Prerequisites:

    apt-get install -y sword-text-web sword-text-sparv sword-text-kjv wordnet-base   # Debian 12
    pip install pysword==0.2.8                                                       # MIT, build only

Command (from the repository root):

    python t5lite/data/corpora/build_corpora.py            # --sword DIR --wordnet DIR --out DIR

Output is deterministic: same inputs, byte-identical files (gzip mtime 0, fixed record order).
Every record carries its split (`train` / `validation` / `test`) from a stable hash of its key,
so the splits never move between builds. See LICENSE.md for provenance and licences.
"""

import argparse
import gzip
import hashlib
import html
import json
import math
import os
import re
import statistics
from collections import Counter

BIBLE_MODULES = {  # output field -> SWORD module name (Debian package)
    'en_web': 'engWEB2015eb',  # sword-text-web: World English Bible (NRSVA versification)
    'es_rv1909': 'spaRV1909eb',  # sword-text-sparv: Reina-Valera 1909
    'en_kjv': 'engKJV2006eb',  # sword-text-kjv: King James Version, 1769 text
}
NT_BOOKS_WITH_COLOPHON = {'Rom', '1Cor', '2Cor', 'Gal', 'Eph', 'Phil', 'Col', '1Thess', '2Thess',
                          '1Tim', '2Tim', 'Titus', 'Phlm', 'Heb'}
WORDNET_POS = {'noun': 'noun', 'verb': 'verb', 'adj': 'adj', 'adv': 'adv'}  # data.<file> -> pos
HELD_OUT_PERCENT = 1  # per held-out split: ~1% validation, ~1% test, ~98% train


def split_for(key: str, salt: str) -> str:
    """Stable split from a hash of `salt:key` (md5: same answer on every machine and Python)."""
    bucket = int(hashlib.md5(f'{salt}:{key}'.encode()).hexdigest(), 16) % 100
    if bucket < HELD_OUT_PERCENT:
        return 'test'
    if bucket < 2 * HELD_OUT_PERCENT:
        return 'validation'
    return 'train'


# ---------------------------------------------------------------------------------------------
# Bible: three SWORD modules aligned verse by verse on (book, chapter, verse).

_DROP = re.compile(  # elements whose content is not verse text: notes, editorial titles, speakers
    r'<note\b.*?</note>|<title(?![^>]*canonical="true")[^>]*>.*?</title>|<speaker\b.*?</speaker>',
    re.S)
_INLINE = re.compile(r'</?(?:w|transChange|divineName|seg|name|foreign|catchWord|hi|rdg)\b[^>]*>')
_TAG = re.compile(r'<[^>]*>')  # everything else is structural (q, l, lg, lb, div, title, item...)
_BOOK_END = re.compile(r'<div\b(?=[^>]*\beID=)(?=[^>]*type="book")[^>]*>.*', re.S)  # + glossary
_USFM = re.compile(r'\\\+?[a-z]+\d*\*?')  # stray USFM markers left in the KJV, e.g. "\\nd LORD"
_BREAK = '\x00'  # marks a removed structural tag: becomes a space unless beside space/punctuation


def clean_verse(osis: str) -> str:
    """OSIS markup -> plain text: drop notes and editorial headings, keep canonical psalm titles."""
    text = _BOOK_END.sub('', osis)  # the WEB appends its glossary to Rev 22:21
    text = _DROP.sub(_BREAK, text)
    text = _INLINE.sub('', text)
    text = _TAG.sub(_BREAK, text)
    text = html.unescape(_USFM.sub('', text)).replace('¶', ' ')  # KJV paragraph signs
    text = re.sub(r'\x00+(?=[\s,.;:!?)\]”’]|$)', '', text)  # "God<note/>." -> "God."
    text = re.sub(r'(?<=[\s(\[“‘])\x00+|^\x00+', '', text)
    text = text.replace(_BREAK, ' ')  # "God<note/>created" -> "God created"
    text = ' '.join(text.split())
    return re.sub(r'(?<=[\w”’]) (?=[?!;:,.](?: |$|[”’]))', '', text)  # "coins ?" -> "coins?"


def read_chapters(sword_dir: str) -> dict[tuple, dict[str, list[str]]]:
    """(book name, osis, chapter) -> field -> cleaned verse texts, in KJV order ('' if absent)."""
    from pysword.modules import SwordModules  # build-time only dependency

    modules = SwordModules(sword_dir)
    found = modules.parse_modules()
    missing = [m for m in BIBLE_MODULES.values() if m not in found]
    if missing:
        raise SystemExit(f'SWORD modules {missing} not in {sword_dir}: apt-get install sword-text-*')
    bibles = {field: modules.get_bible_from_module(m) for field, m in BIBLE_MODULES.items()}
    layouts = {field: {b.osis_name: b.chapter_lengths for books in
                       bible.get_structure().get_books().values() for b in books}
               for field, bible in bibles.items()}
    chapters = {}
    for books in bibles['en_kjv'].get_structure().get_books().values():
        for book in books:  # the 66 books all three share, in canonical order
            for chapter, n_verses in enumerate(book.chapter_lengths, start=1):
                texts = {}
                for field, bible in bibles.items():
                    lengths = layouts[field].get(book.osis_name, [])
                    have = lengths[chapter - 1] if chapter <= len(lengths) else 0
                    texts[field] = [clean_verse(bible.get(books=book.osis_name, chapters=chapter,
                                                          verses=v, clean=False)) if v <= have
                                    else '' for v in range(1, n_verses + 1)]
                chapters[(book.name, book.osis_name, chapter)] = texts
    return chapters


def pair_cost(a: int, b: int, mu: float, sd: float) -> float:
    """Cost of pairing verses of a and b characters: capped squared z-score of log(a / b)."""
    return float('inf') if a == 0 or b == 0 else min(((math.log(a / b) - mu) / sd) ** 2 / 2, 4.5)


def offset_fits_better(src: list[int], ref: list[int], mu: float, sd: float) -> bool:
    """True if src shifted by 1..6 verses pairs with ref at under half the in-place cost.

    Catches whole-chapter shifts too diffuse for the alignment (Job 39 starts with KJV 38:39).
    """
    def mean_cost(offset):
        costs = [pair_cost(src[i + offset], ref[i], mu, sd) for i in range(len(ref))
                 if 0 <= i + offset < len(src) and src[i + offset] and ref[i]]
        return sum(costs) / len(costs) if len(costs) >= 8 else float('inf')

    best = min(mean_cost(o) for o in range(-6, 7) if o)
    return best < 0.5 * mean_cost(0)


def aligned_in_place(src: list[int], ref: list[int], mu: float, sd: float) -> list[bool]:
    """Gale-Church length alignment of one chapter: True where src verse i pairs 1-1 with ref i.

    Why: RV1909 is stored in KJV versification but some chapters keep Spanish numbering (Num 13,
    Job 40, Jonah 2, ...): their verses are shifted or merged, and pairing by number would be wrong.
    Costs: squared length z-score capped at 4.5 per pair (one odd verse never triggers a shift),
    8 to skip a verse (0 for an empty one), 6 for a 2-1 / 1-2 merge.
    """
    n, m, inf = len(src), len(ref), float('inf')
    moves = [(1, 1, 0.0), (1, 0, 8.0), (0, 1, 8.0), (2, 1, 6.0), (1, 2, 6.0)]
    cost = [[inf] * (m + 1) for _ in range(n + 1)]
    back = [[None] * (m + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    for i in range(n + 1):
        for j in range(m + 1):
            for di, dj, penalty in moves:
                if (i, j) == (0, 0) or i < di or j < dj or cost[i - di][j - dj] == inf:
                    continue
                if di and dj:
                    penalty += pair_cost(sum(src[i - di:i]), sum(ref[j - dj:j]), mu, sd)
                elif (di and src[i - 1] == 0) or (dj and ref[j - 1] == 0):
                    penalty = 0.0  # an empty verse costs nothing to skip
                if cost[i - di][j - dj] + penalty < cost[i][j]:
                    cost[i][j], back[i][j] = cost[i - di][j - dj] + penalty, (di, dj)
    keep, i, j = [False] * n, n, m
    while i or j:
        di, dj = back[i][j]
        keep[i - 1] = keep[i - 1] or (di, dj) == (1, 1) and i == j
        i, j = i - di, j - dj
    return keep


def strip_colophon(es: str, kjv: str) -> str:
    """RV1909 ends most epistles with a subscription after 'Amén.' that the KJV module lacks."""
    cut = es.rfind('Amén.')
    return es[:cut + len('Amén.')] if cut >= 0 and kjv.endswith('Amen.') else es


def misaligned(chapters: dict, field: str, dropped: Counter) -> set[tuple]:
    """(chapter key, verse index) pairs where `field` does not pair with the KJV verse."""
    logs = {key: [math.log(len(a) / len(b)) for a, b in zip(t[field], t['en_kjv']) if a and b]
            for key, t in chapters.items()}
    medians = {key: statistics.median(x) if x else 0.0 for key, x in logs.items()}
    sd = statistics.pstdev([x - medians[key] for key, xs in logs.items() for x in xs])
    rejected, shifted = set(), []
    for key, texts in chapters.items():
        src, ref, mu = [len(t) for t in texts[field]], [len(t) for t in texts['en_kjv']], medians[key]
        in_place = aligned_in_place(src, ref, mu, sd)
        if not all(ok or not a or not b for ok, a, b in zip(in_place, src, ref)) or \
                offset_fits_better(src, ref, mu, sd):
            shifted.append(f'{key[1]}.{key[2]}')  # a shift's edges look in place: drop the chapter
            in_place = [False] * len(src)
        for v, (a, b) in enumerate(zip(src, ref)):
            if not a or not b:
                reason = 'empty'
            elif not in_place[v]:
                reason = 'shifted'
            elif abs(math.log(a / b) - mu) > 5 * sd:
                reason = 'length'  # a merged verse or a long insertion
            else:
                continue
            dropped[f'{field} {reason}'] += 1
            rejected.add((key, v))
    print(f'bible: {field} chapters out of line with the KJV, dropped whole: {" ".join(shifted)}')
    return rejected


def read_bible(sword_dir: str) -> list[dict]:
    """Verses whose three texts are non-empty and pair up by number, in canonical order."""
    chapters = read_chapters(sword_dir)
    last_chapter = {key[1]: key for key in chapters}  # osis book -> its last chapter's key
    for osis in NT_BOOKS_WITH_COLOPHON:
        texts = chapters[last_chapter[osis]]
        texts['es_rv1909'][-1] = strip_colophon(texts['es_rv1909'][-1], texts['en_kjv'][-1])
    dropped = Counter()  # the KJV numbering is ours: check the other two against it
    rejected = misaligned(chapters, 'en_web', dropped) | misaligned(chapters, 'es_rv1909', dropped)
    records = []
    for key, texts in chapters.items():
        book, osis, chapter = key
        for v in range(len(texts['en_kjv'])):
            if (key, v) not in rejected:
                ref = f'{osis}.{chapter}.{v + 1}'
                records.append({'id': ref, 'book': book, 'chapter': chapter, 'verse': v + 1,
                                **{f: texts[f][v] for f in BIBLE_MODULES},
                                'split': split_for(ref, 'bible')})
    total = sum(len(t['en_kjv']) for t in chapters.values())
    print(f'bible: {len(records)} of {total} KJV verses kept; dropped because of: {dict(dropped)}')
    return records


# ---------------------------------------------------------------------------------------------
# WordNet 3.0: data.{noun,verb,adj,adv}, one synset per line (format: wndb(5WN)).


def parse_gloss(gloss: str) -> tuple[str, list[str]]:
    """'def; "ex one"; "ex two"' -> ('def', ['ex one', 'ex two'])."""
    quote = gloss.find('"')
    if quote < 0:
        return gloss.strip().rstrip(';').strip(), []
    definition = gloss[:quote].strip().rstrip(';').strip()
    examples = [e.strip() for e in re.findall(r'"([^"]*)"', gloss[quote:]) if e.strip()]
    return definition, examples


def parse_synset_line(line: str) -> tuple[list[str], str, list[str]]:
    """One data-file line -> (words, definition, examples)."""
    fields, _, gloss = line.partition(' | ')
    parts = fields.split()
    n_words = int(parts[3], 16)  # w_cnt is two hex digits
    words = [parts[4 + 2 * i] for i in range(n_words)]
    words = [re.sub(r'\((?:a|p|ip)\)$', '', w).replace('_', ' ') for w in words]  # adj markers
    definition, examples = parse_gloss(gloss)
    return words, definition, examples


def read_wordnet(wordnet_dir: str) -> list[dict]:
    """One record per (word, pos, definition), in data-file order; split by lower-cased word."""
    records, seen = [], set()
    for filename, pos in WORDNET_POS.items():
        path = os.path.join(wordnet_dir, f'data.{filename}')
        with open(path, encoding='utf-8') as f:
            for line in f:
                if line.startswith('  '):  # licence header
                    continue
                words, definition, examples = parse_synset_line(line.rstrip('\n'))
                for word in words:
                    key = (word, pos, definition)
                    if key in seen or not definition:
                        continue
                    seen.add(key)
                    records.append({'word': word, 'pos': pos, 'definition': definition,
                                    'examples': examples,
                                    'split': split_for(word.lower(), 'wordnet')})
    print(f'wordnet: {len(records)} (word, pos, definition) records, '
          f'{len({(r["word"], r["pos"]) for r in records})} (word, pos) pairs')
    return records


# ---------------------------------------------------------------------------------------------


def write_jsonl_gz(records: list[dict], path: str) -> None:
    """Deterministic gzip (mtime 0, no file name in the header), one JSON object per line."""
    with open(path, 'wb') as raw, gzip.GzipFile(filename='', mode='wb', fileobj=raw,
                                                compresslevel=9, mtime=0) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8'))
    counts = Counter(r['split'] for r in records)
    print(f'wrote {path}: {os.path.getsize(path) / 1e6:.2f} MB, splits {dict(sorted(counts.items()))}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sword', default='/usr/share/sword')
    parser.add_argument('--wordnet', default='/usr/share/wordnet')
    parser.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    write_jsonl_gz(read_bible(args.sword), os.path.join(args.out, 'bible.jsonl.gz'))
    write_jsonl_gz(read_wordnet(args.wordnet), os.path.join(args.out, 'wordnet.jsonl.gz'))


if __name__ == '__main__':
    main()
