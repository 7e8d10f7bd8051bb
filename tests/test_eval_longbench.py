"""LongBench reader and metrics: metric values counted by hand, an LCS checked against brute force, prompts
read back through a one-token-per-character tokenizer, truncation checked by string slicing."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval import longbench_metrics as lm
from pyramidkv.eval.longbench import (
    TEMPLATES,
    build_prompt,
    longbench_samples,
    read_longbench,
    truncate_middle,
)
from tests.test_eval_tasks import CharTokenizer


def test_normalize_answer_lowercases_strips_punctuation_and_articles():
    assert lm.normalize_answer("The  Quick, brown-fox!  an Apple") == "quick brownfox apple"
    assert lm.normalize_answer("Theory of the Anthem.") == "theory of anthem"  # whole words only
    assert lm.normalize_answer("A") == ""


def test_qa_f1_of_hand_counted_overlaps():
    # 2 shared tokens; prediction has 4 ("the" dropped), reference 2: P = 1/2, R = 1
    assert lm.qa_f1("The Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 * 0.5 / 1.5)
    # multiset overlap: "red" counts once; P = 1/3, R = 1/2
    assert lm.qa_f1("red red blue", "red green") == pytest.approx(2 * (1 / 6) / (5 / 6))
    assert lm.qa_f1("Paris!", "paris") == 1.0
    assert lm.qa_f1("London", "Paris") == 0.0
    assert lm.qa_f1("", "Paris") == 0.0


def _brute_lcs(a, b) -> int:
    for k in range(min(len(a), len(b)), 0, -1):
        subs = set(itertools.combinations(b, k))
        if any(c in subs for c in itertools.combinations(a, k)):
            return k
    return 0


def _f(common: int, predicted: int, referenced: int) -> float:
    if common == 0:
        return 0.0
    precision, recall = common / predicted, common / referenced
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_is_the_lcs_f_measure_of_single_sentences():
    """On one sentence without repeated words (where summary-level ROUGE-L is plain LCS), 300 random pairs equal
    the F-measure of a brute-force LCS to 1e-6."""
    rng = random.Random(0)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    for _ in range(300):
        a, b = rng.sample(vocab, rng.randint(1, 7)), rng.sample(vocab, rng.randint(1, 7))
        want = _f(_brute_lcs(a, b), len(a), len(b))
        assert abs(lm.rouge_l(" ".join(a), " ".join(b)) - want) <= 1e-6, (a, b)


def test_code_sim_is_the_rounded_indel_similarity():
    """300 random short lines: 2 x brute-force LCS of characters / total length, in whole percent (fuzzywuzzy's
    ratio with python-Levenshtein, which LongBench calls)."""
    rng = random.Random(1)
    for _ in range(300):
        a = "".join(rng.choice("abcx(") for _ in range(rng.randint(1, 7)))
        b = "".join(rng.choice("abcx(") for _ in range(rng.randint(1, 7)))
        want = round(100 * 2 * _brute_lcs(a, b) / (len(a) + len(b))) / 100
        assert lm.code_sim(a, b) == want, (a, b)


def test_rouge_l_of_hand_counted_lcs():
    # LCS = "the gunman" = 2; P = 2/4, R = 2/6
    f = 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)
    assert lm.rouge_l(
        "police killed the gunman", "the gunman was killed by police"
    ) == pytest.approx(f)
    # "." separates, case is kept: only "world" matches, P = R = 1/2
    assert lm.rouge_l("Hello world.", "hello world") == pytest.approx(0.5)
    assert lm.rouge_l("", "anything") == 0.0


def test_classification_counts_named_classes():
    classes = ["location", "other location", "person"]
    # "location" is only part of the reference's name, so it does not count against it
    assert lm.classification("other location", "other location", all_classes=classes) == 1.0
    assert lm.classification("location or person", "location", all_classes=classes) == 0.5
    assert lm.classification("other location", "location", all_classes=classes) == 0.5
    assert lm.classification("person", "location", all_classes=classes) == 0.0
    assert lm.classification("no idea", "location", all_classes=classes) == 0.0
    with pytest.raises(PyramidKVError, match="all_classes"):
        lm.classification("person", "person", all_classes=None)


def test_retrieval_and_count_share_of_right_numbers():
    assert lm.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert lm.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
    assert lm.retrieval("Paragraph 120", "Paragraph 12") == 0.0
    assert lm.retrieval("I do not know", "Paragraph 12") == 0.0
    assert lm.retrieval_zh("段落7", "段落7") == 1.0
    with pytest.raises(PyramidKVError, match="answers"):
        lm.retrieval("Paragraph 1", "the first one")
    assert lm.count("There are 5 unique paragraphs out of 7", "5") == 0.5
    assert lm.count("5", "5") == 1.0


def test_code_sim_takes_first_code_line():
    # "x = foo(" and ")" match: 9 characters of 10 on each side -> 2 * 9 / 20
    assert lm.code_sim("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == pytest.approx(0.9)
    assert lm.code_sim("\n\nreturn a", "return a") == 1.0
    assert lm.code_sim("# only a comment", "abc") == 0.0


def test_score_is_best_answer_and_few_shot_sets_use_first_line():
    assert lm.score_answer("hotpotqa", "Paris", ["the city of Paris", "Paris"]) == 1.0
    answer = "Paris\nQuestion: something Paris"
    assert lm.score_answer("triviaqa", answer, ["Paris"]) == 1.0
    # hotpotqa reads all lines: tokens paris, question, something, paris -> P = 1/4, R = 1
    assert lm.score_answer("hotpotqa", answer, ["Paris"]) == pytest.approx(2 * 0.25 / 1.25)
    assert lm.score_answer("trec", "Human\nLocation", ["Human"], ["Human", "Location"]) == 1.0


def test_dataset_to_metric_map():
    expected = {
        "qa_f1": "narrativeqa qasper multifieldqa_en hotpotqa 2wikimqa musique triviaqa",
        "rouge": "gov_report qmsum multi_news samsum",
        "classification": "trec lsht",
        "retrieval": "passage_retrieval_en",
        "retrieval_zh": "passage_retrieval_zh",
        "count": "passage_count",
        "code_sim": "lcc repobench-p",
    }
    for metric, names in expected.items():
        for name in names.split():
            assert lm.metric_of(name) == metric
    assert set(lm.DATASET_METRIC) == {n for names in expected.values() for n in names.split()}
    assert set(lm.DATASET_METRIC) == set(TEMPLATES)
    assert lm.metric_of("hotpotqa_e") == "qa_f1"  # LongBench-E
    with pytest.raises(PyramidKVError, match="jieba"):
        lm.metric_of("vcsum")
    with pytest.raises(PyramidKVError, match="dataset: got 'squad'"):
        lm.metric_of("squad")


def _row(**fields) -> dict:
    row = {
        "input": "Who wrote it?",
        "context": "It was written by Ada.",
        "answers": ["Ada"],
        "length": 5,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": "abc",
    }
    row.update(fields)
    return row


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("template", [False, True])
def test_read_into_prompts_context_then_question(tmp_path, template):
    tok = CharTokenizer(template)
    path = _write(tmp_path / "lb.jsonl", [_row(), "", _row(input="When?", _id="def")])
    records = read_longbench(path)
    assert [(r.id, r.line, r.input) for r in records] == [
        ("abc", 1, "Who wrote it?"),
        ("def", 3, "When?"),
    ]
    assert records[0].answers == ["Ada"] and records[0].length == 5
    prompt, cut = build_prompt(tok, records[0], 1000)
    head, tail = TEMPLATES["hotpotqa"]
    context, question = tok.decode(prompt.context_ids), tok.decode(prompt.question_ids)
    assert not cut
    assert context.endswith(f"{head}\n\nIt was written by Ada.\n\n")
    assert question.startswith(tail.format(input="Who wrote it?"))


def test_truncate_middle_keeps_head_and_tail():
    tok = CharTokenizer()
    assert truncate_middle(tok, "abcdefghij", 4) == "abij"
    assert truncate_middle(tok, "abcdefghij", 5) == "abhij"
    assert truncate_middle(tok, "abcdefghij", 10) == "abcdefghij"


@pytest.mark.parametrize("template", [False, True])
def test_long_context_is_cut_in_the_middle_to_max_length(tmp_path, template):
    tok = CharTokenizer(template)
    rng = random.Random(1)
    ctx = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(3000))
    path = _write(tmp_path / "lb.jsonl", [_row(context=ctx)])
    head, tail = TEMPLATES["hotpotqa"]
    for max_length in (800, 1501):
        prompt, cut = build_prompt(tok, read_longbench(path)[0], max_length)
        assert cut and prompt.n_tokens <= max_length
        assert prompt.n_tokens == max_length  # one token per character: the room is used exactly
        text = tok.decode(prompt.context_ids + prompt.question_ids)
        kept = text[text.index(head) + len(head) + 2 : text.index(tail.split("{")[0]) - 2]
        h = len(kept) // 2
        assert kept == ctx[:h] + ctx[len(ctx) - (len(kept) - h) :]
        assert tail.format(input="Who wrote it?") in text


def test_max_length_too_short_for_the_instructions(tmp_path):
    path = _write(tmp_path / "lb.jsonl", [_row()])
    with pytest.raises(PyramidKVError, match="max_length: got 50"):
        build_prompt(CharTokenizer(), read_longbench(path)[0], 50)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({k: v for k, v in _row().items() if k != "answers"}, "missing field 'answers'"),
        ({k: v for k, v in _row().items() if k != "context"}, "missing field 'context'"),
        (_row(answers=[]), "'answers' must be a non-empty list"),
        (_row(answers="Ada"), "field 'answers' is a str"),
        (_row(all_classes="a"), "'all_classes'"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_names_path_line_and_field(tmp_path, bad, match):
    path = _write(tmp_path / "bad.jsonl", [_row(), bad])
    with pytest.raises(PyramidKVError, match=match) as info:
        read_longbench(path)
    assert f"{path}:2:" in str(info.value)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(PyramidKVError, match="does not exist"):
        read_longbench(tmp_path / "none.jsonl")
    with pytest.raises(PyramidKVError, match="holds no record"):
        read_longbench(_write(tmp_path / "empty.jsonl", [""]))


def test_unsupported_dataset_names_its_line(tmp_path):
    path = _write(tmp_path / "lb.jsonl", [_row(), _row(dataset="dureader")])
    with pytest.raises(PyramidKVError, match="jieba") as info:
        longbench_samples(path, CharTokenizer(), 1000)
    assert f"{path}:2:" in str(info.value)


def test_samples_in_both_modes_scored_through_the_runner_scorer(tmp_path):
    rows = [
        _row(),
        _row(
            dataset="trec",
            input="Question: Who?\nType:",
            answers=["Human"],
            all_classes=["Human", "Location"],
        ),
        _row(dataset="gov_report", input=""),
    ]
    path = _write(tmp_path / "lb.jsonl", rows)
    samples = longbench_samples(path, CharTokenizer(template=True), 1000, n=2, mode="both")
    assert [(s.task, s.mode) for s in samples] == [
        ("longbench:hotpotqa", "query-aware"),
        ("longbench:hotpotqa", "context-only"),
        ("longbench:trec", "query-aware"),
        ("longbench:trec", "context-only"),
    ]
    qa, co = samples[2], samples[3]
    assert qa.prompt_ids == co.prompt_ids and qa.context_ids == co.context_ids
    assert qa.scorer == "longbench" and qa.max_new_tokens == 64
    assert qa.metadata["all_classes"] == ["Human", "Location"]
    assert qa.metadata["metric"] == "classification" and qa.metadata["longbench_id"] == "abc"
    assert samples[0].max_new_tokens == 32 and samples[0].answers == ["Ada"]
    # through the task registry and the runner's scorer
    from pyramidkv.eval.scoring import score
    from pyramidkv.eval.tasks import make_samples

    again = make_samples(f"longbench:{path}", CharTokenizer(template=True), 1000, 2, mode="both")
    assert [(s.id, s.prompt_ids) for s in again] == [(s.id, s.prompt_ids) for s in samples]
    assert score(qa.scorer, "Human\nLocation", qa.answers, qa.metadata) == 1.0
    assert score(qa.scorer, "Location or Human", qa.answers, qa.metadata) == 0.5
    assert score(samples[0].scorer, "Ada Lovelace", ["Ada"], samples[0].metadata) == pytest.approx(
        2 / 3
    )
