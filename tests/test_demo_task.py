"""The bundled demo fine-tuning task (which play is this passage from?) and its scoring: parsing, splits, the JSONL
files, sequence log-probabilities, multiple-choice accuracy and ``lfpl-eval task=demo``."""

from __future__ import annotations

import json
import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from llmfoundry_pl import tokenizer as tokenizer_module
from llmfoundry_pl.chat import ChatFormat, check_messages
from llmfoundry_pl.config import ModelConfig
from llmfoundry_pl.data import demo_task
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.data.datamodule import IGNORE_INDEX
from llmfoundry_pl.data.demo_task import (
    TITLES,
    Question,
    Speech,
    demo_questions,
    demo_set_dir,
    parse_speeches,
    rejected_title,
    write_demo_sets,
)
from llmfoundry_pl.inference import choice_accuracy, sequence_log_probs
from llmfoundry_pl.interop import save_safetensors
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import run_cli

PLAY = """THE PLAY

DRAMATIS PERSONAE

MISTRESS FORD
PROSPERO, the right Duke of Milan

ACT I.
SCENE 1. An island.

[Enter PROSPERO and MIRANDA]

PROSPERO.
If by your art, my dearest father, you have
Put the wild waters in this roar, allay them.
[Aside] Now to the
cell. [Exit
MIRANDA]

MIRANDA
  The sky, it seems, would pour down stinking pitch,
  But that the sea, mounting to the welkin's cheek,

   II.
   Freeze, freeze, thou bitter sky,

FIRST LORD.
[Exeunt]

ACT 2.

SIR TOBY.
Ay.
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:3] for line in f.read_text().splitlines()]
    return train_tokenizer(lines, vocab_size=400)


def tiny_model(vocab_size: int, max_seq_len: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=max_seq_len,
                      init_std=0.3)
    return Transformer(cfg).eval()


# ---------------------------------------------------------------------------------------------------------------
# The questions
# ---------------------------------------------------------------------------------------------------------------
def test_parse_speeches_keeps_speakers_and_lines_and_drops_stage_directions_and_headings():
    assert parse_speeches(PLAY) == [
        Speech("PROSPERO", ("If by your art, my dearest father, you have",
                            "Put the wild waters in this roar, allay them.", "Now to the", "cell.")),
        Speech("MIRANDA", ("The sky, it seems, would pour down stinking pitch,",
                           "But that the sea, mounting to the welkin's cheek,")),
        Speech("SIR TOBY", ("Ay.",)),  # kept here; demo_questions skips speeches of one line
    ]  # not the cast list, nor the indented stanza number, nor "FIRST LORD." with only a stage direction


def test_every_question_quotes_the_play_its_answer_names():
    raw = {title: (bundled_corpus_dir() / f"{stem}_gut.txt").read_text() for stem, title in TITLES.items()}
    for title, text in raw.items():
        assert text.startswith(title.upper()), title  # the table names each file's own play (its first line)
    # the plays without whitespace or stage directions (from [ to ], or to the paragraph's end if unclosed): every
    # line of a passage must be found in its answer's play
    direction = re.compile(r"\[(?:[^\]\n]|\n(?![ \t]*\n))*\]?")
    squeezed = {title: re.sub(r"\s+", "", direction.sub("", text)) for title, text in raw.items()}
    for question in demo_questions("train") + demo_questions("val"):
        content = question.messages[0]["content"]
        assert content.startswith("Which play is this passage from?\n\n")
        speaker, *lines = content.split("\n\n", 1)[1].split("\n")
        assert speaker.endswith(".") and 2 <= len(lines) <= 4 and all(line == line.strip() for line in lines)
        assert all(re.sub(r"\s+", "", line) in squeezed[question.answer] for line in lines), content
        assert question.choices == list(TITLES.values()) and question.answer in question.choices


def test_splits_are_disjoint_deterministic_and_val_is_balanced():
    train, val = demo_questions("train"), demo_questions("val")
    assert train == demo_questions("train") and val == demo_questions("val")
    passages = {q.messages[0]["content"] for q in train}
    assert len(passages) == len(train) and not passages & {q.messages[0]["content"] for q in val}
    counts = {title: sum(q.answer == title for q in val) for title in TITLES.values()}
    assert len(set(counts.values())) == 1 and min(counts.values()) > 20  # every title, equally often
    assert [q.answer for q in val[:13]] == list(TITLES.values())  # any prefix (task_limit) spans the plays
    assert 300 <= len(val) <= 1000 and 3000 <= len(train) <= 5000
    assert {q.answer for q in train} == set(TITLES.values())
    with pytest.raises(ValueError, match="split='test'"):
        demo_questions("test")


def test_write_demo_sets_writes_the_four_shapes_atomically(tmp_path, monkeypatch):
    paths = write_demo_sets(tmp_path / "demo")
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(p.name for p in paths.values()) == [
        "preference_train.jsonl", "preference_val.jsonl", "sft_train.jsonl", "sft_val.jsonl"]  # no temp files
    for split in ("train", "val"):
        questions = demo_questions(split)
        sft = [json.loads(line) for line in paths[f"sft_{split}"].read_text().splitlines()]
        assert len(sft) == len(questions)
        for row, q in zip(sft, questions, strict=True):
            assert list(row) == ["messages"] and row["messages"] == [*q.messages, {"role": "assistant",
                                                                                  "content": q.answer}]
            check_messages(row["messages"])  # what the fine-tuning reader checks
        preference = [json.loads(line) for line in paths[f"preference_{split}"].read_text().splitlines()]
        assert len(preference) == len(questions)
        for row, q in zip(preference, questions, strict=True):
            assert list(row) == ["prompt", "chosen", "rejected"] and row["prompt"] == q.messages
            assert row["chosen"] == q.answer and row["rejected"] in TITLES.values() and row["rejected"] != q.answer
        assert len({row["rejected"] for row in preference}) == 13  # spread over the titles
    # a write that fails before its rename leaves the old file or none, never half a file
    monkeypatch.setattr(tokenizer_module.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_demo_sets(tmp_path / "crashed")
    assert not list((tmp_path / "crashed").glob("*.jsonl"))


def test_demo_set_dir_builds_once(tmp_path, monkeypatch):
    folder = demo_set_dir(tmp_path)
    assert folder == tmp_path / "demo-task-v1" and len(list(folder.glob("*.jsonl"))) == 4
    monkeypatch.setattr(demo_task, "write_demo_sets", lambda out: pytest.fail("rebuilt a complete set"))
    assert demo_set_dir(tmp_path) == folder
    (folder / "sft_val.jsonl").unlink()  # an incomplete set (e.g. a crash between files) is rebuilt
    monkeypatch.undo()
    assert (demo_set_dir(tmp_path) / "sft_val.jsonl").is_file()


def test_rejected_title_is_a_fixed_wrong_choice():
    q = demo_questions("val")[0]
    assert rejected_title(q) == rejected_title(Question(list(q.messages), q.answer, list(q.choices))) != q.answer


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------
def test_sequence_log_probs_equals_a_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]],
                           [[0.0, 0.0, 0.0], [5.0, -5.0, 0.0], [0.5, 0.0, -0.5]]], requires_grad=True)
    labels = torch.tensor([[0, 2, IGNORE_INDEX], [IGNORE_INDEX, 1, IGNORE_INDEX]])

    def log_p(row: list[float], i: int) -> float:
        return row[i] - math.log(sum(math.exp(v) for v in row))

    expected = [log_p([2, 0, 0], 0) + log_p([0, 1, 3], 2), log_p([5, -5, 0], 1)]
    got = sequence_log_probs(logits, labels)
    assert got.shape == (2,) and got.tolist() == pytest.approx(expected, rel=1e-6)
    got.sum().backward()  # differentiable (DPO trains through it); ignored positions get no gradient
    trained = (labels != IGNORE_INDEX)[..., None]
    assert (logits.grad.abs() * ~trained).sum() == 0 and (logits.grad.abs().sum(-1) > 0).eq(trained[..., 0]).all()


def test_right_padding_does_not_change_a_sequences_score():
    model = tiny_model(50, 16)
    short, long = torch.randint(0, 50, (1, 9)), torch.randint(0, 50, (1, 14))
    short_labels = torch.full((1, 9), IGNORE_INDEX)
    short_labels[0, 4:8] = torch.tensor([3, 1, 4, 1])
    with torch.no_grad():
        alone = sequence_log_probs(model(short), short_labels)
        batch = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1), long])
        labels = torch.cat([torch.cat([short_labels, torch.full((1, 5), IGNORE_INDEX)], 1), long.roll(-1, 1)])
        together = sequence_log_probs(model(batch), labels)
    assert together[0].item() == pytest.approx(alone.item(), rel=1e-5)


class Oracle(nn.Module):
    """A fake model that knows, for each prompt, one reply (``replies``: prompt ids → reply ids, ``<|end|>``
    included) and gives its tokens a logit of 10 at the positions that predict them; every other logit is 0."""

    def __init__(self, chat: ChatFormat, replies: dict[tuple[int, ...], list[int]], vocab_size: int) -> None:
        super().__init__()
        self.chat, self.replies, self.vocab_size = chat, replies, vocab_size
        self.config = SimpleNamespace(max_seq_len=1024)
        self.dummy = nn.Parameter(torch.zeros(1))  # choice_accuracy finds the device from the parameters

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert not self.training  # choice_accuracy put it in eval mode
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            start = row.index(self.chat.role_ids["assistant"])  # position that predicts the reply's first token
            for k, token in enumerate(self.replies[tuple(row[: start + 1])]):
                if start + k < len(row):
                    logits[b, start + k, token] = 10.0
        return logits


@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_choice_accuracy_follows_the_models_preference(tokenizer, batch_size):
    chat = ChatFormat(tokenizer)
    questions = demo_questions("val")[:26]

    def oracle(pick) -> Oracle:
        replies = {tuple(chat.prompt_ids(q.messages)): tokenizer.encode(pick(q)) + [chat.end_id] for q in questions}
        return Oracle(chat, replies, tokenizer.vocab_size).train()

    right = choice_accuracy(oracle(lambda q: q.answer), chat, questions, batch_size=batch_size)
    assert right == {"accuracy": 1.0, "chance": pytest.approx(1 / 13), "questions": 26, "truncated": 0}
    wrong = choice_accuracy(oracle(rejected_title), chat, questions, batch_size=batch_size)
    assert wrong["accuracy"] == 0.0
    # a model that likes the right answer for the first half only
    half = {tuple(chat.prompt_ids(q.messages)): q.answer if i < 13 else rejected_title(q) for i, q in
            enumerate(questions)}
    mixed = Oracle(chat, {p: tokenizer.encode(t) + [chat.end_id] for p, t in half.items()}, tokenizer.vocab_size)
    assert choice_accuracy(mixed, chat, questions, batch_size=batch_size)["accuracy"] == 0.5


def test_choice_accuracy_of_a_real_model_fits_long_questions_into_its_context(tokenizer):
    chat, questions = ChatFormat(tokenizer), demo_questions("val")[:13]
    roomy = choice_accuracy(tiny_model(tokenizer.vocab_size, 256), chat, questions, batch_size=16)
    assert 0 <= roomy["accuracy"] <= 1 and roomy["chance"] == pytest.approx(1 / 13) and roomy["truncated"] == 0
    assert choice_accuracy(tiny_model(tokenizer.vocab_size, 256), chat, questions, batch_size=5) == roomy
    cramped = choice_accuracy(tiny_model(tokenizer.vocab_size, 24), chat, questions)  # every prompt is longer
    assert cramped["questions"] == cramped["truncated"] == 13 and 0 <= cramped["accuracy"] <= 1


# ---------------------------------------------------------------------------------------------------------------
# lfpl-eval task=demo
# ---------------------------------------------------------------------------------------------------------------
def test_eval_task_demo_prints_accuracy_as_json(tokenizer, tmp_path):
    save_safetensors(tiny_model(tokenizer.vocab_size, 256), tokenizer, tmp_path / "model")
    proc = run_cli("eval", "ckpt_path=model", "task=demo", "task_limit=5", "precision=bf16-mixed", cwd=tmp_path)
    assert "task demo: which play is this passage from? 5 held-out questions, 13 choices each" in proc.stdout
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["ckpt_path"] == "model" and record["task"] == "demo" and record["questions"] == 5
    assert record["precision"] == "bf16-mixed"  # as it ran (the text evaluation's record had it; this one did not)
    assert 0 <= record["accuracy"] <= 1 and record["chance"] == pytest.approx(1 / 13)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # writes no files


def test_eval_unknown_task_is_one_line(tmp_path):
    proc = run_cli("eval", "ckpt_path=nowhere", "task=nope", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: task=nope is not a known task; use one of demo, or task=null for loss / perplexity / bits per byte "
        "on text"]
    assert not os.listdir(tmp_path)
