"""WebNLG 2017 and DART scores, computed as their official evaluation scripts compute them.

Both datasets use the WebNLG 2017 challenge scripts. Yale-LILY/dart keeps a copy in
``evaluation/webnlg-automatic-evaluation`` and runs the same tools for DART (``run_eval_on_dart.sh``):

- Text normalisation: put spaces around every non-word character (``' '.join(re.split(r'(\\W)', text))``),
  collapse whitespace and lower-case. WebNLG also applies ``unidecode`` (ASCII transliteration) to both
  sides. The official DART reference files (``all-delex-reference*.lex``) were made without it (we
  reproduce all 15,291 of their lines from the raw XML references), and DART system outputs are scored
  as they are.
- BLEU: Moses ``multi-bleu.perl`` (``-lc`` for WebNLG) over 3 reference files: the 1st, 2nd and 3rd
  reference of each entry, with an empty line where an entry has fewer. multi-bleu.perl counts those
  empty lines as references of length 0 when it picks the reference length closest to the output, so
  they lower the brevity penalty. sacrebleu does the same with ``''`` references (``None`` would drop
  them), so we use sacrebleu with ``tokenize="none"`` and no smoothing.
- METEOR 1.5 (``-l en -norm``) against the same (up to) 3 references.
- TER: tercom 0.7.25, case-insensitive, best reference of (up to) 3, edits divided by the mean reference
  length. We use sacrebleu's TER, a port of tercom.
- chrF++ (sacrebleu, word order 2) is extra. The 2017 scripts do not compute it; here it is computed on
  the normalised text against the same references.

DART's test entries have up to 35 references, but its official reference files keep only the first 3,
so ``max_refs=3`` reproduces the DART leaderboard too (BART-large: BLEU 48.56, METEOR 0.39, TER 0.45).
The ``prepare_files.py`` in that repo would feed only the first reference to METEOR and TER. The published
figures come from all 3, though: METEOR 0.3922 and TER 0.4468 with 3 references, against 0.3637 and 0.523
with the first one only.

DART's model-based metrics (BERTScore, BLEURT, MoverScore) need pretrained weights that we cannot load,
so they are not computed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from sacrebleu.metrics import BLEU, CHRF, TER
from unidecode import unidecode

from .meteor import Meteor15

DATASETS = ("webnlg2017", "dart")


def normalise_reference(text: str, dataset: str = "webnlg2017") -> str:
    """A reference as the official reference files hold it.

    Both split the raw text first, then lower-case; WebNLG's ``evaluation.py`` then unidecodes. The order
    matters for "İ": lower-casing first would give "i" plus a combining dot, which is a non-word character
    and would be split off. Normalising twice changes nothing, except in DART text that holds such
    combining characters: pass DART references raw.
    """
    _check_dataset(dataset)
    if dataset == "dart":
        return _split_non_word(text).lower()
    return unidecode(_split_non_word(text).lower())


def normalise_prediction(text: str, dataset: str = "webnlg2017") -> str:
    """A system output as the official scripts score it.

    WebNLG's ``evaluation.py`` unidecodes the stripped line, then lower-cases, unidecodes again and splits.
    Unidecode comes *before* the split here but *after* it for references. So a character that unidecode
    turns into letters (say ``°`` to ``deg``) is split off in references but stays glued to its word in
    outputs, as in the official files. DART scores outputs as they are; we give them the references'
    normalisation (a no-op on outputs that are already lower-cased and split, such as the leaderboard's).
    """
    _check_dataset(dataset)
    if dataset == "dart":
        return _split_non_word(text).lower()
    return _split_non_word(unidecode(unidecode(text.strip()).lower()))


def _split_non_word(text: str) -> str:
    return " ".join(" ".join(re.split(r"(\W)", text)).split())


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def score(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    max_refs: int | None = 3,
    dataset: str = "webnlg2017",
    meteor: bool = True,
    ter: bool = True,
) -> dict[str, float]:
    """BLEU (0-100), METEOR (0-1), TER (0-1, lower is better) and chrF++ (0-100) of one system.

    ``references[i]`` lists the raw references of entry ``i``. They are normalised here, and only the first
    ``max_refs`` are used (3 in both official scorers; ``None`` uses all, which no official script does).
    ``dataset`` is "webnlg2017" or "dart" and picks the normalisation (DART has no unidecode). For the WebNLG
    S/U/A columns, call this once per subset. ``meteor=False`` / ``ter=False`` skip those two: METEOR starts
    a JVM, and TER is slow (pure Python, several minutes on the 5,097 DART entries).

    DART's model-based metrics (BERTScore, BLEURT, MoverScore) are not computed: they need pretrained
    weights that cannot be loaded here.
    """
    hyps, ref_files = _official_layout(predictions, references, max_refs, dataset)
    scores = {"BLEU": _multi_bleu(hyps, ref_files)}
    if meteor:
        with Meteor15() as jar:
            # The official files pad each entry with empty reference lines; they never win, so this is equal.
            scores["METEOR"] = jar.corpus_score(hyps, [[f[i] for f in ref_files] for i in range(len(hyps))])
    if ter:
        scores["TER"] = corpus_ter(hyps, [[f[i] for f in ref_files if f[i]] for i in range(len(hyps))])
    scores["chrF++"] = CHRF(word_order=2).corpus_score(hyps, _drop_empty(ref_files)).score
    return scores


def columns(categories: Sequence[str | None], seen: Collection[str]) -> dict[str, list[int]]:
    """The paper's WebNLG columns, as indices of entries: seen categories (S), unseen (U), all (A)."""
    return {"S": [i for i, c in enumerate(categories) if c in seen],
            "U": [i for i, c in enumerate(categories) if c not in seen], "A": list(range(len(categories)))}


def score_columns(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    columns: dict[str, Sequence[int]],
    max_refs: int | None = 3,
    dataset: str = "webnlg2017",
    meteor: bool = True,
    ter: bool = True,
) -> dict[str, dict[str, float]]:
    """:func:`score` of each column, a part of the entries given by their indices (WebNLG's seen / unseen /
    all categories), empty columns left out. The same numbers as calling :func:`score` per column, but TER's
    edit search, the slow part (minutes for the 1,862 WebNLG test entries), runs once per entry instead of
    once per column the entry is in."""
    if ter:
        hyps, ref_files = _official_layout(predictions, references, max_refs, dataset)
        stats = ter_segment_stats(hyps, [[f[i] for f in ref_files if f[i]] for i in range(len(hyps))])
    out = {}
    for name, idx in columns.items():
        if len(idx):
            out[name] = score([predictions[i] for i in idx], [references[i] for i in idx], max_refs, dataset, meteor,
                              ter=False)
            if ter:
                out[name]["TER"] = ter_from_stats([stats[i] for i in idx])
    return out


def _official_layout(predictions, references, max_refs, dataset) -> tuple[list[str], list[list[str]]]:
    """Normalised outputs, and one reference "file" per reference position with '' where an entry has
    fewer references (the official layout)."""
    _check_dataset(dataset)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} entries")
    hyps = [normalise_prediction(p, dataset) for p in predictions]
    refs = []
    for i, rs in enumerate(references):
        if isinstance(rs, str) or not any(r.strip() for r in rs):
            raise ValueError(f"references[{i}] must be a non-empty list of strings")
        refs.append([normalise_reference(r, dataset) for r in rs if r.strip()][:max_refs])
    n_files = max(len(rs) for rs in refs)
    return hyps, [[rs[j] if j < len(rs) else "" for rs in refs] for j in range(n_files)]


def _bleu() -> BLEU:
    return BLEU(lowercase=True, tokenize="none", smooth_method="none", force=True)


def _multi_bleu(hyps: list[str], ref_files: list[list[str]]) -> float:
    """multi-bleu.perl's corpus BLEU. Empty references stay in (as length-0 references) on purpose."""
    return _bleu().corpus_score(hyps, ref_files).score


def bleu_item_stats(predictions: Sequence[str], references: Sequence[Sequence[str]], max_refs: int | None = 3,
                    dataset: str = "webnlg2017") -> list[list[int]]:
    """Per entry, what the corpus BLEU of :func:`score` sums (sacrebleu's sufficient statistics:
    output length, closest reference length, matches n = 1..4, n-grams n = 1..4);
    :func:`bleu_from_stats` of their sum over any subset is that subset's corpus BLEU."""
    hyps, ref_files = _official_layout(predictions, references, max_refs, dataset)
    return [list(map(int, s)) for s in _bleu()._extract_corpus_statistics(hyps, ref_files)]


def bleu_from_stats(stats):
    """Corpus BLEU (0-100, no smoothing, as multi-bleu.perl) from summed :func:`bleu_item_stats`
    (10 numbers), or from a numpy array ``[..., 10]`` of such sums."""
    import numpy as np

    s = np.asarray(stats, dtype=np.float64)
    sys_len, ref_len, correct, total = s[..., 0], s[..., 1], s[..., 2:6], s[..., 6:10]
    brevity = np.where(sys_len < ref_len, np.exp(1 - ref_len / np.maximum(sys_len, 1e-9)), 1.0)
    brevity = np.where(sys_len > 0, brevity, 0.0)
    ok = (correct > 0).all(axis=-1) & (total > 0).all(axis=-1)
    log_p = np.log(np.where(ok[..., None], correct / np.maximum(total, 1), 1.0)).mean(axis=-1)
    bleu = np.where(ok, 100 * brevity * np.exp(log_p), 0.0)
    return float(bleu) if bleu.ndim == 0 else bleu


def corpus_ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """tercom 0.7.25's "Total TER" (0-1): for each segment the fewest edits (insertions, deletions,
    substitutions, shifts of word sequences) to turn the hypothesis into one of its references. The edits are
    summed and divided by the summed mean reference length. Case-insensitive, as tercom is by default; words are
    split on whitespace only (tercom without ``-N``). Empty references are left out, as the official ``.ter``
    reference files have none.
    """
    return ter_from_stats(ter_segment_stats(hypotheses, references))


def ter_segment_stats(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[float]]:
    """Per segment, what :func:`corpus_ter` sums: its fewest edits and its mean reference length. A segment's
    depend on it alone, so the statistics of a corpus give the TER of any part of it (:func:`ter_from_stats`)."""
    n_files = max(len(rs) for rs in references)
    ref_files = [[rs[j] if j < len(rs) and rs[j] else None for rs in references] for j in range(n_files)]
    return TER(case_sensitive=False)._extract_corpus_statistics(list(hypotheses), ref_files)


def ter_from_stats(stats: Sequence[Sequence[float]]) -> float:
    """:func:`corpus_ter` of the segments whose :func:`ter_segment_stats` are ``stats``."""
    return TER(case_sensitive=False)._aggregate_and_compute(list(stats)).score / 100


def _drop_empty(ref_files: list[list[str]]) -> list[list[str | None]]:
    return [[r if r else None for r in f] for f in ref_files]
