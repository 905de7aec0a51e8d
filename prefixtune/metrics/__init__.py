"""Evaluation metrics that reproduce the official scorers of the paper's tasks (one module per scorer family).

- ``e2e``: E2E NLG Challenge (BLEU, NIST, METEOR, ROUGE-L, CIDEr), as ``measure_scores.py`` of
  tuetschek/e2e-metrics computes them; also the Prefix-Tuning paper's variant (``-p``).
- ``webnlg``: WebNLG 2017 and DART (BLEU, METEOR, TER, and chrF++ as an extra), as the WebNLG 2017
  challenge scripts compute them (which Yale-LILY/dart uses too).
- ``rouge``: ROUGE-1/2/L/Lsum for summarisation (rouge-score, with stemming).
- ``meteor``: the METEOR 1.5 runner shared by ``e2e`` and ``webnlg``.

Each module is imported on its own (``from prefixtune.metrics import e2e``): they need Java
(METEOR, PTB tokeniser), pycocoevalcap, sacrebleu, unidecode and rouge-score.
"""
