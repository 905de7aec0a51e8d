"""E2E NLG Challenge scores, computed as the official scorer computes them.

The official scorer is ``measure_scores.py`` of https://github.com/tuetschek/e2e-metrics. It reports:

- BLEU and NIST from MT-Eval ``mteval-v13a-sig.pl`` (Perl), in the version edited for E2E, where NIST's
  average reference length counts only the non-empty references of each MR. The published challenge
  numbers come from it. We re-implement it in Python (``mteval_bleu_nist``), with its tokenisation and
  its quirks.
- METEOR 1.5, ROUGE-L and CIDEr(-D) from the MS-COCO caption evaluation code (pycocoevalcap). They are
  computed on PTB-tokenised, lower-cased text with punctuation removed. We call the same pycocoevalcap
  code.

``variant="prefix-tuning"`` gives what Prefix-Tuning (Li & Liang, 2021) reports. That paper runs
``measure_scores.py <gold> <output> -p -t -H``, where ``-p`` swaps MT-Eval for its Python port
(``pymteval_bleu_nist``: other tokenisation details and another NIST length rule). Its gold file holds the
*tokenised* references of ``src1_test.txt``, grouped per MR with blank lines between MRs; ``read_references``
reads that layout too. The COCO metrics are the same in both variants.

Scores use the official scales: BLEU, METEOR and ROUGE_L in 0-1, NIST and CIDEr unbounded.
"""

from __future__ import annotations

import csv
import functools
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from ..data import DataError
from .meteor import Meteor15

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
VARIANTS = ("official", "prefix-tuning")

# Column names that measure_scores.py accepts for the MR and the output column of a TSV/CSV file.
HEADER_MR = r"(mr|src|source|meaning(?:[_ .-]rep(?:resentation)?)?|da|dial(?:ogue)?[_ .-]act)s?"
HEADER_OUTPUT = r"(out(?:put)?|ref(?:erence)?|sys(?:tem)?(?:[_ .-](?:out(?:put)?|ref(?:erence)?))?)s?"
HEADER_REFERENCE = r"(trg|tgt|target|ref(?:erence)?|human(?:[_ .-](?:ref(?:erence)?))?)s?"

# measure_scores.py repairs these mis-encodings in every TSV/CSV line it reads (outputs and references).
MOJIBAKE_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


# ---------------------------------------------------------------------------------------------------------
# Reading files


def read_references(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read E2E references, grouped per MR in order of first appearance. Returns ``(mrs, references)``.

    Two layouts, told apart by the extension as measure_scores.py does:
    - ``.csv``/``.tsv`` with an MR and a reference column (``testset_w_refs.csv``, ``devset.csv``): one row
      per (MR, reference) pair.
    - any other extension: plain text with one reference per line and a blank line after each MR's
      references (the Prefix-Tuning gold file, e2e-metrics' ``devel-conc.txt``). Such a file has no MRs,
      so ``mrs`` holds empty strings and predictions for it must be plain text. A file without any blank
      line is read as one reference per MR.
    """
    path = Path(path)
    if _is_table(path):
        rows = _read_table(path, HEADER_MR, HEADER_REFERENCE)
        grouped: dict[str, list[str]] = {}
        for _, mr, ref in rows:
            grouped.setdefault(mr, []).append(ref)
        return list(grouped), list(grouped.values())

    groups: list[list[str]] = [[]]
    for number, line in enumerate(_official_lines(path), 1):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
        else:
            raise DataError(f"{path}, line {number}: a second blank line in a row (an MR without references)")
    if not groups[-1]:
        groups.pop()
    if len(groups) == 1:  # no blank line at all: measure_scores.py takes it as one reference per MR
        groups = [[ref] for ref in groups[0]]
    if not groups:
        raise DataError(f"{path}: no references")
    return [""] * len(groups), groups


def read_predictions(path: str | Path, mrs: Sequence[str]) -> list[str]:
    """Read system outputs and return them in the order of ``mrs`` (as given by ``read_references``).

    - ``.tsv``/``.csv``: columns MR and output, matched to the references by MR (exact string). A header
      row (``MR<TAB>output`` or the other names measure_scores.py accepts), a UTF-8 BOM and quoted fields
      are fine. An MR without a reference, a repeated MR or a missing MR is an error.
    - anything else: plain text, one output per line, one line per MR in the order of ``mrs``.
    Raises ``DataError`` (a ``ValueError``) naming the file and line.
    """
    path = Path(path)
    if not _is_table(path):
        lines = list(_official_lines(path))
        if len(lines) != len(mrs):
            raise DataError(
                f"{path}: {len(lines)} lines, but the references have {len(mrs)} MRs "
                "(plain-text predictions need exactly one line per distinct MR, in the references' order)"
            )
        return lines

    if not any(mrs):
        raise DataError(f"{path}: the references have no MRs (plain-text layout), so give plain-text predictions")
    wanted = {mr: i for i, mr in enumerate(mrs)}
    outputs: list[str | None] = [None] * len(mrs)
    for number, mr, output in _read_table(path, HEADER_MR, HEADER_OUTPUT):
        if mr not in wanted:
            hint = ""
            if len(mr) > 1 and mr[0] == mr[-1] and mr[0] in "'\"" and mr[1:-1] in wanted:
                hint = " (it would match without its surrounding quotes)"
            raise DataError(
                f"{path}, line {number}: MR {mr[:100]!r} has no reference{hint}; "
                "the official scorer rejects this file too (\"Didn't find a reference for source\")"
            )
        if outputs[wanted[mr]] is not None:
            raise DataError(f"{path}, line {number}: MR {mr[:100]!r} appears a second time")
        outputs[wanted[mr]] = output
    missing = [mr for mr, output in zip(mrs, outputs) if output is None]
    if missing:
        raise DataError(f"{path}: no output for {len(missing)} of {len(mrs)} MRs, e.g. {missing[0][:100]!r}")
    return outputs  # type: ignore[return-value]


def _is_table(path: Path) -> bool:
    return re.search(r"\.[ct]sv$", path.name, re.I) is not None


def _official_lines(path: Path) -> list[str]:
    """The lines of a file as measure_scores.py sees them: stripped, split as ``codecs`` splits lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from e
    # codecs' line iterator splits on every Unicode line boundary (str.splitlines), not only on '\n'.
    return [line.strip() for line in text.splitlines()]


def _read_table(path: Path, header_mr: str, header_text: str) -> list[tuple[int, str, str]]:
    """(line number, MR, text) rows of a TSV/CSV file, read like measure_scores.py's ``read_tsv``."""
    rows: list[tuple[int, list[str]]] = []
    delimiter = None
    for number, line in enumerate(_official_lines(path), 1):
        if number == 1:
            line = line.replace("\ufeff", "")  # the scorer drops a BOM on the first line only
        for wrong, right in MOJIBAKE_FIXES:
            line = line.replace(wrong, right)
        if not line:
            continue  # the scorer skips empty lines
        if delimiter is None:  # tab-separated if the first line has a tab, else comma-separated
            delimiter = "\t" if "\t" in line else ","
        rows.append((number, next(csv.reader([line], delimiter=delimiter))))
    if not rows:
        raise DataError(f"{path}: empty file")

    first = rows[0][1]
    # measure_scores.py uses re.match (a prefix match), so an output starting with "Out..." in a file without
    # header would pass for a header; we require the whole name. It also crashes on files without a header;
    # we read those as "MR, text" when they have two columns.
    mr_columns = [i for i, name in enumerate(first) if re.fullmatch(header_mr, name, re.I)]
    text_columns = [i for i, name in enumerate(first) if re.fullmatch(header_text, name, re.I)]
    if len(mr_columns) == len(text_columns) == 1:
        mr_column, text_column = mr_columns[0], text_columns[0]
        rows = rows[1:]
    elif not mr_columns and not text_columns and len(first) == 2:
        mr_column, text_column = 0, 1
    else:
        raise DataError(
            f"{path}, line {rows[0][0]}: cannot tell the MR and text columns apart in {first!r} "
            "(want a header naming them, or exactly two columns without header)"
        )
    out = []
    for number, row in rows:
        if len(row) != len(first):
            raise DataError(f"{path}, line {number}: {len(row)} columns, but the first line has {len(first)}")
        out.append((number, row[mr_column], row[text_column]))
    return out


# ---------------------------------------------------------------------------------------------------------
# Scoring


def score(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    variant: str = "official",
    meteor: bool = True,
) -> dict[str, float]:
    """BLEU, NIST, METEOR, ROUGE_L and CIDEr of one system, as measure_scores.py reports them.

    ``references[i]`` lists the references of the MR of ``predictions[i]``. ``variant`` is "official"
    (the E2E challenge's Perl MT-Eval) or "prefix-tuning" (``measure_scores.py -p``, Python MT-Eval).
    ``meteor=False`` skips METEOR, the slow one (a Java process).
    """
    return score_many({"": predictions}, references, variant, meteor)[""]


def score_many(
    systems: Mapping[str, Sequence[str]],
    references: Sequence[Sequence[str]],
    variant: str = "official",
    meteor: bool = True,
) -> dict[str, dict[str, float]]:
    """``score`` for several systems on the same references, sharing the Java processes (much faster)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    _check_shapes(systems, references)
    bleu_nist = mteval_bleu_nist if variant == "official" else pymteval_bleu_nist
    results = {}
    for name, predictions in systems.items():
        bleu, nist = bleu_nist(predictions, references)
        results[name] = {"BLEU": bleu, "NIST": nist}
    for name, coco in coco_scores(systems, references, meteor).items():
        results[name].update(coco)
    return {name: {m: results[name][m] for m in METRICS if m in results[name]} for name in results}


def _check_shapes(systems: Mapping[str, Sequence[str]], references: Sequence[Sequence[str]]) -> None:
    if not references:
        raise ValueError("no references")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings")
    for name, predictions in systems.items():
        if isinstance(predictions, str) or len(predictions) != len(references):
            label = f"system {name!r}: " if name else ""
            raise ValueError(f"{label}{len(predictions)} predictions for {len(references)} MRs")


# ---------------------------------------------------------------------------------------------------------
# MT-Eval v13a as edited for E2E (mteval/mteval-v13a-sig.pl in e2e-metrics)

# Perl's \s on text read as UTF-8 (Python's \s also matches \x1c-\x1f, Perl's does not).
_PERL_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_PUNCTUATION = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_NIST_BETA = -math.log(0.5) / math.log(1.5) / math.log(1.5)


def mteval_tokenize(text: str) -> list[str]:
    """MT-Eval v13a's default (non-international) tokenisation, lower-casing ASCII only (``tr/A-Z/a-z/``).

    measure_scores.py writes each text unescaped into an SGML ``<seg>``; MT-Eval collapses whitespace runs
    there, then undoes four entities and splits punctuation off. Text that contains ``</seg>`` would break
    the official scorer; we do not imitate that.
    """
    text = _PERL_SPACE.sub(" ", text)  # SGML reading: s/[\s\n\r]+/ /g over the whole document
    text = text.replace("<skipped>", "")
    # Entities are replaced one after another, so "&amp;lt;" ends as "<", as in the Perl code.
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} ".translate(_ASCII_LOWER)
    text = _PUNCTUATION.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", text)  # period/comma not preceded by a digit
    text = re.sub(r"([\.,])([^0-9])", r" \1 \2", text)  # period/comma not followed by a digit
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # dash after a digit
    text = _PERL_SPACE.sub(" ", text).strip(" ")
    return text.split(" ") if text else []


def _clipping_counts(refs: Sequence[Sequence[str]], corpus_counts: Counter) -> dict:
    """Max count of each 1-5-gram over one segment's references (BLEU clipping); adds all counts to corpus_counts (NIST)."""
    ref_max: dict = {}
    for r in refs:
        counts = _ngram_counts(r, 5)
        corpus_counts.update(counts)
        for ngram, count in counts.items():
            if count > ref_max.get(ngram, 0):
                ref_max[ngram] = count
    return ref_max


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def mteval_bleu_nist(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Corpus BLEU (0-1) and NIST as the E2E scorer's ``mteval-v13a-sig.pl`` computes them.

    - BLEU: 4-grams, clipped by the maximum count in any reference; reference length = the closest one
      (ties: the shorter); MT-Eval's smoothing (only matters when some n-gram order has no match at all).
    - NIST: 5-grams weighted by information gain estimated from all references of the corpus. The length
      penalty compares the output length with the total reference length divided by the average number of
      *non-empty* references per MR (the E2E edit; plain v13a divides by the number of reference sets).
    """
    _check_shapes({"": predictions}, references)
    refs = _mteval_references(tuple(tuple(rs) for rs in references))
    matches = [0] * 6  # index n = n-gram order
    hyp_ngrams_total = [0] * 6
    info_total = [0.0] * 6
    bleu_ref_length = 0
    for prediction, (ref_lengths, ref_max) in zip(predictions, refs.segments):
        hyp = mteval_tokenize(prediction)
        bleu_ref_length += _mteval_closest_length(len(hyp), ref_lengths)
        for n in range(1, 6):
            hyp_ngrams_total[n] += max(len(hyp) - n + 1, 0)
        for ngram, count in _ngram_counts(hyp, 5).items():
            if ngram in ref_max:
                clipped = min(count, ref_max[ngram])
                matches[len(ngram)] += clipped
                info_total[len(ngram)] += refs.info[ngram] * clipped

    # BLEU with MT-Eval's default smoothing: a zero match count at order n counts as 1/2^k.
    log_precision = 0.0
    smooth = 1
    for n in range(1, 5):
        if hyp_ngrams_total[n] == 0:
            continue
        if matches[n] == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * hyp_ngrams_total[n]))
        else:
            log_precision += math.log(matches[n] / hyp_ngrams_total[n])
    brevity = math.exp(min(0.0, 1 - bleu_ref_length / hyp_ngrams_total[1])) if hyp_ngrams_total[1] else 0.0
    bleu = math.exp(log_precision / 4) * brevity

    nist = sum(info_total[n] / max(hyp_ngrams_total[n], 1) for n in range(1, 6))
    nist *= _nist_length_penalty(hyp_ngrams_total[1] / (refs.words / refs.refs_per_mr))
    return bleu, nist


class _MtevalReferences(NamedTuple):
    segments: list[tuple[list[int], dict]]  # per MR: reference lengths in MT-Eval's visiting order, max n-gram counts
    info: dict  # n-gram -> NIST information weight
    words: int  # reference words in the corpus
    refs_per_mr: float  # mean number of non-empty references per MR


@functools.lru_cache(maxsize=4)  # scoring many systems against the same references tokenises them once
def _mteval_references(references: tuple[tuple[str, ...], ...]) -> _MtevalReferences:
    refs = [[mteval_tokenize(r) for r in rs] for rs in references]
    n_sets = max(len(rs) for rs in refs)
    # measure_scores.py pads every MR to n_sets references with empty ones, named ref_0, ref_1, ...; MT-Eval
    # visits them in sorted name order (ref_0, ref_1, ref_10, ...). Only the first one visited can matter.
    visit_order = sorted(range(n_sets), key=lambda j: f"ref_{j}") if n_sets > 1 else [0]

    corpus_counts: Counter = Counter()
    segments = []
    for rs in refs:
        ref_max = _clipping_counts(rs, corpus_counts)
        padded = rs + [[]] * (n_sets - len(rs))
        segments.append(([len(padded[j]) for j in visit_order], ref_max))
    words = sum(len(r) for rs in refs for r in rs)
    nonempty = sum(1 for rs in refs for r in rs if r)

    info = {}
    for ngram, count in corpus_counts.items():
        prefix = " ".join(ngram[:-1])
        # Perl tests the (n-1)-gram string for truth: "" (unigrams) and also the word "0" are false, and then
        # the n-gram count is divided by the total number of reference words.
        if prefix and prefix != "0":
            info[ngram] = -math.log(count / corpus_counts[ngram[:-1]]) / math.log(2)
        else:
            info[ngram] = -math.log(count / words) / math.log(2)
    return _MtevalReferences(segments, info, words, nonempty / len(refs))


def _mteval_closest_length(hyp_length: int, ref_lengths: list[int]) -> int:
    """MT-Eval's closest reference length (ties: the shorter). The first reference visited is taken even when
    empty; later empty ones are skipped."""
    closest = ref_lengths[0]
    for length in ref_lengths[1:]:
        if length and (
            abs(hyp_length - length) < abs(hyp_length - closest)
            or (abs(hyp_length - length) == abs(hyp_length - closest) and length < closest)
        ):
            closest = length
    return closest


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


# ---------------------------------------------------------------------------------------------------------
# Python MT-Eval (metrics/pymteval.py in e2e-metrics, used by ``measure_scores.py -p``)


def pymteval_tokenize(text: str) -> list[str]:
    """pymteval's tokenisation: MT-Eval's rules with Python regexes, no lower-casing (done when matching).

    An empty text gives one empty token, as in pymteval.
    """
    text = re.sub(r"<skipped>", "", text)
    text = re.sub(r"-\n", "", text)
    text = re.sub(r"\n", " ", text)
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} "
    text = _PUNCTUATION.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", text)
    text = re.sub(r"([\.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.split(" ")


def pymteval_bleu_nist(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, float]:
    """Corpus BLEU (0-1) and NIST as pymteval computes them (``measure_scores.py -p``).

    Differences from the Perl MT-Eval: Unicode lower-casing; n-gram "lengths" of short outputs go
    negative (``len - n + 1`` is not floored at 0, as in pymteval); BLEU floors zero precisions at 1e-15
    instead of smoothing; NIST's reference length is the sum over MRs of the mean reference length, and
    information weights use 0-grams (total reference words) for unigrams.
    """
    _check_shapes({"": predictions}, references)
    refs = _pymteval_references(tuple(tuple(rs) for rs in references))
    bleu_stats = [0] * 9
    nist_info = [0.0] * 5
    nist_lengths = [0] * 5
    for prediction, segment in zip(predictions, refs.segments):
        bleu_part, info, lengths = _pymteval_segment(prediction, segment, refs.info)
        bleu_stats = [a + b for a, b in zip(bleu_stats, bleu_part)]
        nist_info = [a + b for a, b in zip(nist_info, info)]
        nist_lengths = [a + b for a, b in zip(nist_lengths, lengths)]
    nist = sum(info / (length if length else 1) for info, length in zip(nist_info, nist_lengths))
    return pymteval_bleu_from_stats(bleu_stats), nist * _nist_length_penalty(nist_lengths[0] / refs.mean_length_sum)


def pymteval_bleu_item_stats(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[int]]:
    """Per output, what pymteval's corpus BLEU sums: clipped n-gram hits (n = 1..4), n-gram counts
    (n = 1..4) and the closest reference length. ``pymteval_bleu_from_stats`` of their sum over
    any subset of outputs is that subset's corpus BLEU (for bootstrap resampling over test items)."""
    _check_shapes({"": predictions}, references)
    refs = _pymteval_references(tuple(tuple(rs) for rs in references))
    return [_pymteval_segment(p, segment, refs.info)[0] for p, segment in zip(predictions, refs.segments)]


def pymteval_bleu_from_stats(stats):
    """Corpus BLEU (0-1) from summed :func:`pymteval_bleu_item_stats` (a list of 9 numbers), or from
    a numpy array ``[..., 9]`` of such sums (one BLEU per leading index)."""
    import numpy as np

    s = np.asarray(stats, dtype=np.float64)
    hits, lengths, ref_length = s[..., 0:4], s[..., 4:8], s[..., 8]
    hyp_length = np.where(lengths[..., 0] != 0, lengths[..., 0], 1e-5)
    brevity = np.where(lengths[..., 0] <= ref_length, np.exp(1.0 - ref_length / hyp_length), 1.0)
    log_precision = np.log(np.maximum(hits, 1e-15) / np.maximum(lengths, 1e-9)).sum(axis=-1)
    bleu = brevity * np.exp(log_precision / 4)
    return float(bleu) if bleu.ndim == 0 else bleu


def _pymteval_segment(prediction: str, segment: tuple[list[int], dict], info: dict):
    """One output's pymteval counts: (BLEU stats as in pymteval_bleu_item_stats, NIST information
    per n = 1..5, NIST n-gram counts per n)."""
    ref_lengths, ref_max = segment
    hyp = [w.lower() for w in pymteval_tokenize(prediction)]
    hits, nist_info = [0] * 4, [0.0] * 5
    for ngram, count in _ngram_counts(hyp, 5).items():
        clipped = min(count, ref_max.get(ngram, 0))
        if clipped:
            if len(ngram) <= 4:
                hits[len(ngram) - 1] += clipped
            nist_info[len(ngram) - 1] += info[ngram] * clipped
    lengths = [len(hyp) - n for n in range(5)]  # may go negative, as in pymteval
    closest = min(ref_lengths, key=lambda length: (abs(length - len(hyp)), length))
    return hits + lengths[:4] + [closest], nist_info, lengths


class _PymtevalReferences(NamedTuple):
    segments: list[tuple[list[int], dict]]  # per MR: reference lengths, max n-gram counts (lower-cased)
    info: dict  # n-gram -> NIST information weight
    mean_length_sum: float  # sum over MRs of the mean reference length


@functools.lru_cache(maxsize=4)
def _pymteval_references(references: tuple[tuple[str, ...], ...]) -> _PymtevalReferences:
    corpus_counts: Counter = Counter()
    segments = []
    mean_length_sum = 0.0
    for rs in references:
        tokenized = [[w.lower() for w in pymteval_tokenize(r)] for r in rs]
        ref_max = _clipping_counts(tokenized, corpus_counts)
        words = sum(len(r) for r in tokenized)
        corpus_counts[()] += words  # the 0-gram count: total reference words
        mean_length_sum += words / len(tokenized)
        segments.append(([len(r) for r in tokenized], ref_max))
    info = {g: math.log(corpus_counts[g[:-1]] / c, 2) for g, c in corpus_counts.items() if g}
    return _PymtevalReferences(segments, info, mean_length_sum)


# ---------------------------------------------------------------------------------------------------------
# MS-COCO caption metrics (pycocoevalcap), as measure_scores.py runs them


def coco_scores(
    systems: Mapping[str, Sequence[str]], references: Sequence[Sequence[str]], meteor: bool = True
) -> dict[str, dict[str, float]]:
    """METEOR, ROUGE_L and CIDEr per system, on PTB-tokenised lower-cased text as in measure_scores.py.

    One PTB tokeniser run covers the references and all systems: the Java tokeniser keeps one output line
    per input line (``-preserveLines``, empty lines included), so batching does not change any token.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = {("ref", i): [{"caption": r} for r in rs] for i, rs in enumerate(references)}
    for name, predictions in systems.items():
        captions.update({("sys", name, i): [{"caption": p}] for i, p in enumerate(predictions)})
    tokenized = PTBTokenizer().tokenize(captions)
    gts = {i: tokenized[("ref", i)] for i in range(len(references))}

    results = {}
    for name in systems:
        res = {i: tokenized[("sys", name, i)] for i in range(len(references))}
        results[name] = {
            "ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
            "CIDEr": float(Cider().compute_score(gts, res)[0]),
        }
    if meteor:
        with Meteor15() as jar:
            for name in systems:
                hyps = [tokenized[("sys", name, i)][0] for i in range(len(references))]
                results[name]["METEOR"] = jar.corpus_score(hyps, [gts[i] for i in range(len(references))])
    return results
