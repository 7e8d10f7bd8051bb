"""Task generators: seeded, of the asked length, needles where they say, answers that the text supports.

A character tokenizer (one token per character) makes every check independent of the generator's own
bookkeeping: the depth of a needle is read off the decoded prompt by plain string search, and each RULER
answer is recomputed from the prompt text by parsing or counting.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from pyramidkv.errors import PyramidKVError
from pyramidkv.eval.tasks import GROUPS, TASKS, make_samples, task_names


class CharTokenizer:
    """One token per character (ids 3.. for a fixed alphabet, 1 = BOS); other characters read as ``?``.

    With ``template=True`` it has a chat template that wraps the user turn in ``[user]`` ... ``[assistant]``.
    """

    ALPHABET = (
        string.ascii_letters
        + string.digits
        + " \n"
        + "".join(c for c in string.punctuation if c not in "`~^|{}")
    )

    def __init__(self, template: bool = False):
        self.index = {c: i + 3 for i, c in enumerate(self.ALPHABET)}
        self.chat_template = "[user]...[assistant]" if template else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.index.get(c, self.index["?"]) for c in text]
        return {"input_ids": [1] * add_special_tokens + ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(
            self.ALPHABET[i - 3] if i - 3 < len(self.ALPHABET) else "?" for i in ids if i >= 3
        )

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return f"[user]\n{messages[0]['content']}\n[/user]\n[assistant]\n"


def text_of(tokenizer, sample) -> str:
    return tokenizer.decode(sample.prompt_ids)


def test_same_seed_same_samples_other_seed_other_samples():
    tok = CharTokenizer()
    for task in TASKS:
        a = make_samples(task, tok, 1500, 2, seed=3)
        b = make_samples(task, tok, 1500, 2, seed=3)
        c = make_samples(task, tok, 1500, 2, seed=4)
        assert [(s.prompt_ids, s.answers) for s in a] == [(s.prompt_ids, s.answers) for s in b]
        assert [s.prompt_ids for s in a] != [s.prompt_ids for s in c], task
        assert a[0].prompt_ids != a[1].prompt_ids, task


@pytest.mark.parametrize("template", [False, True])
def test_prompts_are_within_two_percent_of_the_target_length(template):
    tok = CharTokenizer(template)
    for task in TASKS:
        for length in (2000, 3500):
            for sample in make_samples(task, tok, length, 1, seed=1):
                n = len(sample.prompt_ids)
                assert 0.98 * length <= n <= length, (task, length, n)


@pytest.mark.parametrize("task", ["needle", "passkey"])
def test_needle_lands_at_its_depth(task):
    tok = CharTokenizer(template=True)
    samples = make_samples(task, tok, 2500, 11, seed=2)
    assert len({s.depth for s in samples}) >= 5
    for sample in samples:
        text = text_of(tok, sample)
        needle = re.search(r"The pass key is \d+\. Remember it: the pass key is \d+\.", text)
        start = text.index("\n\n", text.index("[user]")) + 2  # the haystack follows the preamble
        end = text.rindex("\n\nWhat is the pass key?")
        haystack = end - start - len(needle.group())
        depth = (needle.start() - start) / haystack
        assert abs(depth - sample.depth) <= 0.02, (sample.id, depth, sample.depth)
        assert needle.group().count(sample.answers[0]) == 2


def test_context_is_a_prefix_and_both_modes_see_the_same_tokens():
    tok = CharTokenizer(template=True)
    qa, co = make_samples("needle", tok, 1200, 1, seed=0, mode="both")
    assert (qa.mode, co.mode) == ("query-aware", "context-only")
    assert qa.prompt_ids == co.prompt_ids and qa.context_ids == co.context_ids
    assert qa.prefill_ids[0].tolist() == qa.prompt_ids and qa.append_ids is None
    assert co.prefill_ids[0].tolist() == co.context_ids
    assert co.append_ids[0].tolist() == co.question_ids
    question = tok.decode(qa.question_ids)
    assert question == "What is the pass key? Answer with the number only.\n[/user]\n[assistant]\n"
    assert tok.decode(qa.context_ids).startswith("[user]\nA pass key is hidden")


def _facts(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in re.findall(
        r"special magic (?:numbers?|UUIDs?) for ([a-z-]+) is ([\w-]+)\.", text
    ):
        found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("subtask", [n for n in TASKS if n.startswith("ruler:niah")])
def test_niah_answers_are_the_values_of_the_asked_keys(subtask):
    tok = CharTokenizer()
    for sample in make_samples(subtask, tok, 3000, 3, seed=5):
        text = text_of(tok, sample)
        body, question = text.rsplit("\n\n", 1)
        facts = _facts(body)
        asked = [k for k in facts if k in question]
        assert asked, question
        assert sorted(sample.answers) == sorted(v for k in asked for v in facts[k])
        expected_keys = 4 if subtask.endswith(("multikey", "multiquery")) else 1
        expected_values = 4 if subtask.endswith("multivalue") else 1
        assert len(facts) == expected_keys
        assert all(len(v) == expected_values for v in facts.values())
        if subtask.endswith("single_3"):
            assert re.fullmatch(
                r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                sample.answers[0],
            )
        else:
            assert all(re.fullmatch(r"\d{7}", a) for a in sample.answers)


def test_variable_tracking_answer_follows_the_chain():
    tok = CharTokenizer()
    for sample in make_samples("ruler:vt", tok, 3000, 3, seed=6):
        text = text_of(tok, sample)
        value = re.search(r"assigned the value (\d+)", text).group(1)
        binds = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)\.", text))
        holding = {name for name, rhs in binds.items() if rhs == value}
        while True:
            more = {n for n, rhs in binds.items() if rhs.startswith("VAR ") and rhs[4:] in holding}
            if more <= holding:
                break
            holding |= more
        assert sorted(sample.answers) == sorted(holding) and len(holding) == 5


def test_common_words_are_the_ten_most_common():
    tok = CharTokenizer()
    for sample in make_samples("ruler:cwe", tok, 4000, 2, seed=7):
        listed = re.findall(r"^\d+\. ([a-z]+)$", text_of(tok, sample), flags=re.M)
        counts = Counter(listed).most_common()
        top = {w for w, _ in counts[:10]}
        assert top == set(sample.answers)
        assert counts[9][1] > counts[10][1]


def test_frequent_words_are_the_three_most_frequent():
    tok = CharTokenizer()
    for sample in make_samples("ruler:fwe", tok, 3000, 3, seed=8):
        text = text_of(tok, sample)
        stream = text.split("\n\n")[1].split()
        counts = Counter(stream).most_common()
        assert {w for w, _ in counts[:3]} == set(sample.answers)
        assert counts[2][1] > counts[3][1]


def test_ruler_group_has_all_subtasks_and_n_samples_each():
    assert len(GROUPS["ruler"]) == 9 and task_names("ruler") == GROUPS["ruler"]
    samples = make_samples("ruler", CharTokenizer(), 1500, 1, seed=0, mode="both")
    assert len(samples) == 18 and len({s.id for s in samples}) == 18


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        (dict(task="nope"), "task"),
        (dict(n=0), "samples"),
        (dict(mode="sideways"), "mode"),
        (dict(length=40), "length"),
    ],
)
def test_bad_input_names_the_option(kwargs, option):
    args = dict(task="passkey", length=1000, n=1, mode="query-aware") | kwargs
    with pytest.raises(PyramidKVError, match=option):
        make_samples(args["task"], CharTokenizer(), args["length"], args["n"], 0, args["mode"])


def _token_at(tokenizer, ids: list[int], char: int) -> int:
    """The first token whose decoded prefix reaches past ``char`` (bisection on decoded lengths)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


@pytest.mark.slow
def test_real_tokenizer_lengths_depths_and_template(smollm2):
    """SmolLM2's tokenizer: lengths, the chat template, natural tokenization (decode then encode gives
    the same ids), and the needle's depth measured in tokens found by decoding prefixes."""
    _, tokenizer = smollm2
    for length in (1000, 2000):
        for sample in make_samples("needle", tokenizer, length, 11, seed=0):
            ids = sample.prompt_ids
            assert 0.98 * length <= len(ids) <= length
            text = tokenizer.decode(ids)
            assert text.startswith("<|im_start|>system")
            assert text.endswith("<|im_start|>assistant\n")
            assert list(tokenizer(text, add_special_tokens=False)["input_ids"]) == ids
            assert tokenizer.decode(sample.question_ids).startswith("What is the pass key?")
            needle = re.search(r"The pass key is \d+\. Remember it: the pass key is \d+\.", text)
            start = _token_at(
                tokenizer, ids, text.index("\n\n", text.index("<|im_start|>user")) + 2
            )
            at = _token_at(tokenizer, ids, needle.start())
            after = _token_at(tokenizer, ids, needle.end())
            end = len(sample.context_ids)
            depth = (at - start) / (end - start - (after - at))
            assert abs(depth - sample.depth) <= 0.02, (sample.id, depth)
