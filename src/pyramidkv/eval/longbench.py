"""LongBench-format jsonl files a user already has (Bai et al. 2024), read into the runner's samples.

One JSON object per line, with the fields of LongBench's release:

* ``input`` (str, required) — the question or instruction; empty for the summarisation datasets and lcc;
* ``context`` (str, required) — the long document, passages, few-shot examples or code;
* ``answers`` (list of str, required, non-empty) — the reference answers; the score is the best over them;
* ``dataset`` (str, required) — the LongBench dataset name (``hotpotqa``, ``gov_report``, ...; LongBench-E's
  ``_e`` suffix is accepted); it picks the prompt, the answer length and the metric;
* ``length`` (int, optional) — LongBench's length of the sample (words, or characters for Chinese);
* ``language`` (str, optional) — ``en`` or ``zh``;
* ``all_classes`` (list of str or null, optional) — the class names of trec and lsht, needed to score them;
* ``_id`` (str, optional) — the sample's id in LongBench.

The supported datasets are those whose metric needs no extra model or segmenter
(:data:`~pyramidkv.eval.longbench_metrics.DATASET_METRIC`). Each prompt puts an instruction, then the context,
then the question with the instruction repeated, as LongBench's templates do (the wording here is our own); it
is tokenized as one user turn of the model's chat template when it has one (LongBench leaves its few-shot and
code datasets without one; here every dataset is treated alike, as the other tasks are). The context ends
where the question starts, so both modes of :mod:`~pyramidkv.eval.tasks.base` see the same tokens.

A context too long for ``max_length`` tokens (whole prompt, template included) is cut in the middle: its first
and last tokens are kept, half of the room each, as LongBench's ``pred.py`` does — but here only the context is
cut, so the question and the instructions always survive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pyramidkv.checks import check_int
from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.longbench_metrics import base_dataset, metric_of
from pyramidkv.eval.tasks.base import MODE_CHOICES, MODES, Draft, Sample, samples_of
from pyramidkv.eval.tasks.layout import Layout, Prompt, build, count, encode

REQUIRED = {"input": str, "context": str, "answers": list, "dataset": str}

_DOC = "Answer as briefly as you can, with a single phrase if possible, and give no explanation."
_PASSAGES = "Answer with the answer only and no other words."
_FEW_SHOT = "Some examples come first."
_QUESTION = "\n\nQuestion: {input}\n\nAnswer:"
# dataset -> (instruction before the context, text after it with the question in ``{input}``)
TEMPLATES: dict[str, tuple[str, str]] = {
    "narrativeqa": (
        f"Below is a story (a novel or a film script), then a question about it. {_DOC}\n\nStory:",
        f"Answer the question from the story above. {_DOC}{_QUESTION}",
    ),
    "qasper": (
        "Below is a scientific article, then a question about it. Answer as briefly as you can, with a "
        'phrase or sentence. Write "unanswerable" if the article does not answer it, and "yes", "no" or '
        '"unanswerable" for a yes/no question. Give no explanation.\n\nArticle:',
        'Answer the question from the article above as briefly as you can; write "unanswerable" if it '
        f'does not answer it, and "yes", "no" or "unanswerable" for a yes/no question.{_QUESTION}',
    ),
    "multifieldqa_en": (
        "Read the text below and answer the question after it briefly.",
        f"Answer the question from the text above with the answer only.{_QUESTION}",
    ),
    **dict.fromkeys(
        ("hotpotqa", "2wikimqa", "musique"),
        (
            f"Answer the question from the passages below. {_PASSAGES}\n\nPassages:",
            f"Answer the question from the passages above. {_PASSAGES}{_QUESTION}",
        ),
    ),
    "gov_report": (
        "Below is a report by a government agency. You will write a one-page summary of it.\n\nReport:",
        "Write a one-page summary of the report above.\n\nSummary:",
    ),
    "qmsum": (
        "Below is a meeting transcript, then a query about it. Answer the query in one or more "
        "sentences.\n\nTranscript:",
        "Answer the query from the transcript above in one or more sentences.\n\nQuery: {input}\n\nAnswer:",
    ),
    "multi_news": (
        "Below are several news articles. You will write a one-page summary of all of them.\n\nNews:",
        "Write a one-page summary of all the news above.\n\nSummary:",
    ),
    "trec": (f"Find the type of the last question. {_FEW_SHOT}", "{input}"),
    "triviaqa": (
        f"Answer the question from its passage, with the answer only. {_FEW_SHOT}",
        "{input}",
    ),
    "samsum": (f"Summarize the dialogue in a few short sentences. {_FEW_SHOT}", "{input}"),
    "lsht": ("请判断最后一则新闻属于哪个类别。先给出一些示例。", "{input}"),
    "passage_count": (
        "Below are paragraphs from Wikipedia; some of them may appear more than once. Count the distinct "
        "paragraphs, once duplicates are removed.",
        "How many distinct paragraphs are there once duplicates are removed? Reply with the number only, "
        "such as 1, 2 or 3.\n\nThe answer is:",
    ),
    "passage_retrieval_en": (
        "Below are paragraphs from Wikipedia, then an abstract of one of them. Find the paragraph the "
        "abstract was written from.",
        'Abstract:\n\n{input}\n\nWhich paragraph is the abstract from? Reply as "Paragraph 1", "Paragraph 2" '
        "and so on.\n\nThe answer is:",
    ),
    "passage_retrieval_zh": (
        "下面是若干段落，然后是其中一段的摘要。请找出摘要出自哪一段。",
        '摘要：\n\n{input}\n\n摘要出自哪一段？请按"段落1"、"段落2"这样的格式回答。\n\n答案是：',
    ),
    "lcc": ("Complete the code below.", "Next line of code:\n"),
    "repobench-p": ("Complete the code below.", "{input}Next line of code:\n"),
}
# LongBench's answer lengths (tokens), from its ``dataset2maxlen.json``
MAX_NEW_TOKENS: dict[str, int] = {
    **dict.fromkeys(("narrativeqa", "qasper", "samsum"), 128),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news"), 512),
    **dict.fromkeys(("multifieldqa_en", "trec", "lsht", "lcc", "repobench-p"), 64),
    **dict.fromkeys(
        ("hotpotqa", "2wikimqa", "musique", "triviaqa", "passage_count", "passage_retrieval_en"), 32
    ),
    "passage_retrieval_zh": 32,
}


@dataclass
class LongBenchRecord:
    """One line of a LongBench file (see the module docstring); ``line`` is its 1-based line number."""

    input: str
    context: str
    answers: list[str]
    dataset: str
    length: int = 0
    language: str = "en"
    all_classes: list[str] | None = None
    id: str = ""
    line: int = 0


def _check(path: Path, line: int, row: object) -> LongBenchRecord:
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise PyramidKVError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name, kind in REQUIRED.items():
        if name not in row:
            raise PyramidKVError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], kind):
            raise PyramidKVError(
                f"{where}: field {name!r} is a {type(row[name]).__name__}, expected a {kind.__name__}"
            )
    answers, classes = row["answers"], row.get("all_classes")
    if not answers or not all(isinstance(a, str) for a in answers):
        raise PyramidKVError(f"{where}: field 'answers' must be a non-empty list of strings")
    if classes is not None and not (
        isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    ):
        raise PyramidKVError(f"{where}: field 'all_classes' must be a list of strings or null")
    length = row.get("length", 0)
    check_int(f"{where}: field 'length'", length)
    return LongBenchRecord(
        input=row["input"],
        context=row["context"],
        answers=list(answers),
        dataset=row["dataset"],
        length=length,
        language=str(row.get("language", "en")),
        all_classes=list(classes) if classes is not None else None,
        id=str(row.get("_id", f"line{line}")),
        line=line,
    )


def read_longbench(path: str | Path) -> list[LongBenchRecord]:
    """The records of a LongBench jsonl file, in file order; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise PyramidKVError(f"longbench file: {str(path)!r} does not exist or is not a file")
    records = []
    with path.open(encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise PyramidKVError(f"{path}:{line}: not valid JSON ({error.msg})") from None
            records.append(_check(path, line, row))
    if not records:
        raise PyramidKVError(f"longbench file: {str(path)!r} holds no record")
    return records


def _layout(record: LongBenchRecord, context: str) -> Layout:
    head, tail = TEMPLATES[base_dataset(record.dataset)]
    return Layout(haystack=context, question=tail.format(input=record.input), preamble=head)


def truncate_middle(tokenizer, text: str, room: int) -> str:
    """``text`` cut to at most ``room`` tokens by dropping its middle: the first ``room // 2`` tokens and the
    last ``room - room // 2`` are kept (LongBench's truncation); ``text`` itself when it fits."""
    ids = encode(tokenizer, text, first=False)
    if len(ids) <= room:
        return text
    head = room // 2
    return tokenizer.decode(ids[:head]) + tokenizer.decode(ids[len(ids) - (room - head) :])


def build_prompt(tokenizer, record: LongBenchRecord, max_length: int) -> tuple[Prompt, bool]:
    """The tokenized prompt of ``record`` of at most ``max_length`` tokens, and whether its context was cut."""
    metric_of(record.dataset)  # fails early on a dataset without a supported metric
    fixed = count(tokenizer, _layout(record, ""))
    room = max_length - fixed
    if room < 2:
        raise PyramidKVError(
            f"max_length: got {max_length}; the prompt of {record.dataset} sample {record.id} needs "
            f"{fixed} tokens without its context, so expected at least {fixed + 2}"
        )
    context = truncate_middle(tokenizer, record.context, room)
    while (
        True
    ):  # a cut can retokenize a token or two longer where the halves meet: shrink until it fits
        prompt = build(tokenizer, _layout(record, context))
        if prompt.n_tokens <= max_length:
            return prompt, context != record.context
        room -= max(prompt.n_tokens - max_length, 1)
        if room < 2:
            raise PyramidKVError(f"max_length: got {max_length}; too short for sample {record.id}")
        context = truncate_middle(tokenizer, record.context, room)


def longbench_samples(
    path: str | Path, tokenizer, max_length: int, n: int | None = None, mode: str = "query-aware"
) -> list[Sample]:
    """The first ``n`` records (all when None) of the LongBench file ``path`` as samples of at most
    ``max_length`` tokens, in ``mode`` (``both`` gives each record in both modes).

    A sample's task is ``longbench:<dataset>``, its scorer ``longbench``, and its metadata holds the dataset,
    the metric, ``all_classes``, LongBench's ``_id`` and ``length``, and whether the context was cut.
    """
    if mode not in MODE_CHOICES:
        raise PyramidKVError(f"mode: got {mode!r}; expected one of {', '.join(MODE_CHOICES)}")
    if n is not None:
        check_int("samples", n, 1)
    check_int("max_length", max_length, 1)
    records = read_longbench(path)[:n]
    for record in records:
        try:
            metric_of(record.dataset)
        except PyramidKVError as error:
            raise PyramidKVError(f"{path}:{record.line}: {error}") from None
    modes = MODES if mode == "both" else (mode,)
    found: list[Sample] = []
    for index, record in enumerate(records):
        prompt, cut = build_prompt(tokenizer, record, max_length)
        draft = Draft(
            prompt=prompt,
            answers=record.answers,
            scorer="longbench",
            max_new_tokens=MAX_NEW_TOKENS[base_dataset(record.dataset)],
            metadata={
                "dataset": record.dataset,
                "metric": metric_of(record.dataset),
                "all_classes": record.all_classes,
                "longbench_id": record.id,
                "longbench_length": record.length,
                "language": record.language,
                "truncated": cut,
            },
        )
        task = f"longbench:{base_dataset(record.dataset)}"
        found.extend(samples_of(draft, task, max_length, index, modes))
    return found
