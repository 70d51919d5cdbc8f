"""The bundled demo fine-tuning task: "Which play is this passage from?", built from the 13 bundled comedies.

A question shows one speech — the speaker's name and up to four of its lines — and asks for the play::

    <|user|>Which play is this passage from?

    PROSPERO.
    Thou poisonous slave, got by the devil himself
    Upon thy wicked dam, come forth!<|end|>
    <|assistant|>The Tempest<|end|>

Why this task: it needs no download (the plays ship in the package), every answer is one of 13 known titles, so
the result is a number with a floor — accuracy against chance, 1/13 ≈ 7.7% — instead of samples to eyeball.
It is learnable by a tiny model in minutes (the speakers' names alone give most plays away; the words and the
verse give the rest), so supervised fine-tuning and DPO visibly move it. ``lfpl-eval task=demo`` scores a model on
the held-out questions by log-likelihood over the 13 titles (:func:`llmfoundry_pl.inference.choice_accuracy`).

How the questions are made, deterministically (no random state; the same files give the same questions):

- A speech is a paragraph whose first line is a speaker's name in capitals (``PROSPERO.``; A Midsummer Night's
  Dream omits the full stop, so the name is always rewritten as ``NAME.`` — the layout must not give a play away,
  and for the same reason the lines lose their indentation). Stage directions in [brackets] are removed; speeches
  with fewer than two lines of text left are skipped (``Ay, my lord.`` could come from any play).
- Held out: every 7th eligible speech of each play. The held-out questions are then thinned evenly to the same
  number per play, so that always answering the most frequent title also scores chance. The rest are training
  questions (each play in proportion to its length).
- The preference pairs (for DPO) reject a wrong title picked by a hash of the passage, so they too are fixed.

The files written for fine-tuning (:func:`write_demo_sets`, cached by :func:`demo_set_dir`) are JSONL:
``sft_*.jsonl`` rows ``{"messages": [user, assistant]}``, ``preference_*.jsonl`` rows
``{"prompt": [user], "chosen": title, "rejected": other title}``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.files import atomic_write_bytes

# File stem (assets/shakespeare/<stem>_gut.txt) → the title a question is answered with.
TITLES = {
    "alls_well_that_ends_well": "All's Well That Ends Well",
    "as_you_like_it": "As You Like It",
    "comedy_of_errors": "The Comedy of Errors",
    "loves_labours_lost": "Love's Labour's Lost",
    "measure_for_measure": "Measure for Measure",
    "merchant_of_venice": "The Merchant of Venice",
    "merry_wives_of_windsor": "The Merry Wives of Windsor",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "much_ado_about_nothing": "Much Ado About Nothing",
    "taming_of_the_shrew": "The Taming of the Shrew",
    "tempest": "The Tempest",
    "twelfth_night": "Twelfth Night",
    "two_gentlemen_of_verona": "The Two Gentlemen of Verona",
}
QUESTION = "Which play is this passage from?\n\n"
PASSAGE_LINES = 4  # lines of a speech shown after the speaker's name: ~50-80 tokens with a 4k-token vocabulary
MIN_LINES = 2  # shorter speeches are skipped
VAL_EVERY = 7  # every 7th eligible speech of each play is held out (39 to 70 per play before thinning)
SPLITS = ("train", "val")
CACHE_NAME = "demo-task-v1"  # bump the version when the questions or the file shapes change
FILES = {
    "sft_train": "sft_train.jsonl", "sft_val": "sft_val.jsonl",
    "preference_train": "preference_train.jsonl", "preference_val": "preference_val.jsonl",
}

# A speaker line: words in capitals (with ' & - and commas between them: "FERDINAND, MIRANDA"), an optional full
# stop, nothing else — not indented (numbered song stanzas such as "   II." are indented).
_SPEAKER = re.compile(r"[A-Z][A-Z'&-]*(?:[ ,]+[A-Z][A-Z'&-]*)*\.?")
_HEADINGS = re.compile(r"(ACT|SCENE|INDUCTION|PROLOGUE|EPILOGUE|THE END|DRAMATIS PERSONAE)\b")
# [closed], possibly over lines, or unclosed to the line end; with the spaces before it ("pains [giving him
# money]. What" → "pains. What")
_STAGE_DIRECTION = re.compile(r"[ \t]*(?:\[[^\]]*\]|\[[^\n]*)")
_FIRST_ACT = re.compile(r"^(act|induction)\b", re.IGNORECASE | re.MULTILINE)  # the cast list comes before it


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the conversation so far, the right reply and every reply allowed."""

    messages: list[dict]
    answer: str
    choices: list[str]


@dataclass(frozen=True)
class Speech:
    speaker: str
    lines: tuple[str, ...]


def parse_speeches(text: str) -> list[Speech]:
    """The speeches of a play in Project Gutenberg layout, in order, stage directions removed (speeches left with
    no text are dropped; short ones are kept: the caller decides)."""
    speeches = []
    first_act = _FIRST_ACT.search(text)  # the cast list before it has lines in capitals too ("MISTRESS FORD")
    for paragraph in re.split(r"\n[ \t]*\n", text[first_act.start() if first_act else 0 :]):
        head, _, body = paragraph.strip("\n").partition("\n")
        head = head.rstrip()
        if not _SPEAKER.fullmatch(head) or _HEADINGS.match(head):
            continue
        lines = tuple(line.strip() for line in _STAGE_DIRECTION.sub("", body).splitlines())
        lines = tuple(line for line in lines if any(c.isalpha() for c in line))
        if lines:
            speeches.append(Speech(head.rstrip(".").strip(), lines))
    return speeches


@functools.cache
def _play_speeches() -> dict[str, tuple[Speech, ...]]:
    """Title → its eligible speeches (at least MIN_LINES lines), read once per process."""
    plays = {}
    for stem, title in TITLES.items():
        text = (bundled_corpus_dir() / f"{stem}_gut.txt").read_text(encoding="utf-8")
        plays[title] = tuple(s for s in parse_speeches(text) if len(s.lines) >= MIN_LINES)
    return plays


def passage(speech: Speech) -> str:
    return f"{speech.speaker}.\n" + "\n".join(speech.lines[:PASSAGE_LINES])


def demo_questions(split: str) -> list[Question]:
    """The questions of ``split`` ("train" or "val"), in a fixed order that takes the plays in turn."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {', '.join(SPLITS)}")
    plays = _play_speeches()
    per_play_val = min(len(range(0, len(s), VAL_EVERY)) for s in plays.values())
    chosen = {}
    for title, speeches in plays.items():
        if split == "train":
            chosen[title] = [s for i, s in enumerate(speeches) if i % VAL_EVERY != 0]
        else:
            held_out = speeches[::VAL_EVERY]
            # evenly spaced, so each play's held-out questions still span the whole play
            chosen[title] = [held_out[i * len(held_out) // per_play_val] for i in range(per_play_val)]
    # Round robin over the plays: the first N questions (lfpl-eval task_limit=N) cover every play about equally.
    rounds = itertools.zip_longest(*chosen.values())  # (1st of each play), (2nd of each play), ...; None when out
    order = [(title, s) for row in rounds for title, s in zip(chosen, row, strict=True) if s is not None]
    return [Question([{"role": "user", "content": QUESTION + passage(s)}], title, list(TITLES.values()))
            for title, s in order]


def rejected_title(question: Question) -> str:
    """A wrong title for the preference pair, fixed by a hash of the question (the same on every machine and
    Python version, unlike ``hash()`` or ``random``)."""
    wrong = [c for c in question.choices if c != question.answer]
    digest = hashlib.sha256(question.messages[-1]["content"].encode()).digest()
    return wrong[int.from_bytes(digest[:8], "big") % len(wrong)]


def write_demo_sets(out_dir: str | Path) -> dict[str, Path]:
    """Write the four JSONL files of the demo task into ``out_dir``; returns {"sft_train": path, ...}. Each file
    is written to a temporary name and renamed, so a file that exists is complete."""
    out = Path(out_dir).expanduser()
    paths = {}
    for split in SPLITS:
        questions = demo_questions(split)
        sft = [{"messages": [*q.messages, {"role": "assistant", "content": q.answer}]} for q in questions]
        preference = [{"prompt": q.messages, "chosen": q.answer, "rejected": rejected_title(q)} for q in questions]
        for kind, rows in (("sft", sft), ("preference", preference)):
            key = f"{kind}_{split}"
            paths[key] = out / FILES[key]
            atomic_write_bytes(paths[key], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return paths


def demo_set_dir(cache_dir: str | Path) -> Path:
    """``<cache_dir>/demo-task-v1/`` holding the demo task's files, written on first use."""
    folder = Path(cache_dir).expanduser() / CACHE_NAME
    if not all((folder / name).is_file() for name in FILES.values()):
        write_demo_sets(folder)
    return folder
