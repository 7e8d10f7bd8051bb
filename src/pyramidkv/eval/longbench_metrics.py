"""LongBench's metrics (Bai et al. 2024, "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding"), for the datasets whose metric needs no extra model or segmenter.

Each metric compares one prediction with one reference answer and returns a score in [0, 1];
:func:`score_answer` takes the best score over a sample's reference answers, as LongBench's ``eval.py`` does,
after cutting the prediction to its first line for the few-shot datasets (trec, triviaqa, samsum, lsht).

* ``qa_f1`` — token F1 of SQuAD: both texts lowercased, punctuation and the articles a/an/the removed,
  split on whitespace; F1 of the multiset overlap.
* ``rouge`` — ROUGE-L F-measure (Lin 2004) computed by the ``rouge`` package LongBench's scorer calls
  (summary-level LCS over ``.``-split sentences), 0 where that package raises (an empty text), as LongBench
  does: the same numbers as published ones.
* ``classification`` — the class names of ``all_classes`` that occur in the prediction, minus those that are
  only part of the reference's name; 1 / (their number) when the reference is among them, else 0 (also when
  none occurs: LongBench's fallback to the most similar class is never reached in its code).
* ``retrieval`` / ``retrieval_zh`` — the paragraph number in the reference ("Paragraph 12" / "段落12"); the
  share of the numbers in the prediction that equal it.
* ``count`` — the share of the numbers in the prediction that equal the reference count.
* ``code_sim`` — the first line of the prediction that holds no backtick, ``#`` or ``//``, compared with the
  reference line by rapidfuzz's ``fuzz.ratio`` (the InDel similarity, 2 x longest common subsequence of
  characters / total length) rounded to whole percent: what LongBench's fuzzywuzzy ``ratio`` returns with
  python-Levenshtein installed.

Not supported: multifieldqa_zh and dureader / vcsum (their F1 and ROUGE need the jieba word segmenter).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable

from rapidfuzz import fuzz
from rouge import Rouge

from pyramidkv.errors import PyramidKVError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace (SQuAD's rule)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def qa_f1(prediction: str, reference: str, **_) -> float:
    """Token F1 of the normalised texts; 0 when they share no token."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str, **_) -> float:
    """ROUGE-L F-measure of the ``rouge`` package; 0 where it raises (an empty text, a text of dots)."""
    try:
        return Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]
    except (ValueError, RecursionError):
        return 0.0


def classification(
    prediction: str, reference: str, all_classes: list[str] | None = None, **_
) -> float:
    """1 / (classes named in the prediction) when the reference class is among them, else 0."""
    if not all_classes:
        raise PyramidKVError("all_classes: a classification sample needs its list of class names")
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if c == reference or c not in reference]
    return 1.0 / len(named) if reference in named else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def _paragraph(reference: str, pattern: str) -> str:
    found = re.search(pattern, reference)
    if found is None:
        raise PyramidKVError(
            f"answers: got {reference!r}; a retrieval answer must name its paragraph as {pattern!r}"
        )
    return found.group(1)


def retrieval(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction equal to the reference's ``Paragraph N``."""
    return _share_equal(prediction, _paragraph(reference, r"Paragraph (\d+)"))


def retrieval_zh(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction equal to the reference's ``段落N``."""
    return _share_equal(prediction, _paragraph(reference, r"段落(\d+)"))


def count(prediction: str, reference: str, **_) -> float:
    """Share of the numbers in the prediction equal to the reference count."""
    return _share_equal(prediction, reference.strip())


def code_sim(prediction: str, reference: str, **_) -> float:
    """Similarity of the prediction's first code line (no backtick, ``#``, ``//``) to the reference, in whole
    percent (module docstring)."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if not any(m in x for m in ("`", "#", "//"))), "")
    return round(fuzz.ratio(line, reference)) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "rouge": rouge_l,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}

DATASET_METRIC: dict[str, str] = {
    **dict.fromkeys(
        ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"),
        "qa_f1",
    ),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "rouge"),
    **dict.fromkeys(("trec", "lsht"), "classification"),
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "passage_count": "count",
    **dict.fromkeys(("lcc", "repobench-p"), "code_sim"),
}
NEEDS_SEGMENTER = ("multifieldqa_zh", "dureader", "vcsum")
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def base_dataset(dataset: str) -> str:
    """The LongBench dataset name, with LongBench-E's ``_e`` suffix dropped."""
    if dataset.endswith("_e") and dataset[:-2] in DATASET_METRIC:
        return dataset[:-2]
    return dataset


def metric_of(dataset: str) -> str:
    """Name of the metric LongBench scores ``dataset`` with."""
    name = base_dataset(dataset)
    if name in DATASET_METRIC:
        return DATASET_METRIC[name]
    if name in NEEDS_SEGMENTER:
        raise PyramidKVError(
            f"dataset: {dataset!r} is scored with the jieba word segmenter, which pyramidkv does not ship"
        )
    raise PyramidKVError(
        f"dataset: got {dataset!r}; expected one of {', '.join(sorted(DATASET_METRIC))}"
    )


def score_answer(
    dataset: str, prediction: str, answers: list[str], all_classes: list[str] | None = None
) -> float:
    """LongBench's score of ``prediction``: the best of its dataset's metric over ``answers``."""
    if not answers:
        raise PyramidKVError("answers: no reference answer to score against")
    metric = METRICS[metric_of(dataset)]
    if base_dataset(dataset) in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max(metric(prediction, ref, all_classes=all_classes) for ref in answers)
