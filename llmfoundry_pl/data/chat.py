"""Fine-tuning data: JSONL conversations (SFT) or preference pairs (DPO) → padded or packed batches for Lightning.

Accepted lines (one JSON object each):

- chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``
- instruction (Alpaca style): ``{"instruction": "...", "input": "...", "output": "..."}`` → user, assistant
- preference: ``{"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}``

Every example goes through the one chat template (llmfoundry_pl/chat.py), so training, ``lfpl-generate chat=true``
and the exported Hugging Face tokenizer see the same ids. Targets are IGNORE_INDEX everywhere except the
assistant's replies.

As for pretraining, the order is a pure function of (seed, sample index): sample ``k`` is example
``permutation(seed, epoch)[k mod N]`` with epoch = k // N, and micro-batches are cut by the same
:class:`StepBatchSampler` — so resuming at step s sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llmfoundry_pl.chat import ChatFormat, Message, check_messages
from llmfoundry_pl.config import ChatDataConfig, ConfigError
from llmfoundry_pl.data.datamodule import (
    IGNORE_INDEX,
    RankShare,
    StepBatchSampler,
    StepDataModule,
    remaining_micro_batches,
)
from llmfoundry_pl.tokenizer import Tokenizer, check_encodable

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------------
# Reading JSONL
# ------------------------------------------------------------------------------------------------------------------
def read_records(path: Path, fmt: str, bad_lines: str) -> list[dict]:
    """The examples of a JSONL file in one shape: ``{"messages"}`` (sft) or ``{"prompt", "chosen", "rejected"}``
    with prompt as messages (preference). A malformed line stops with its line number (``bad_lines=fail``) or
    is skipped and counted (``skip``)."""
    if path.is_dir():
        raise ConfigError(f"data file {path} is a folder; give a .jsonl file in data.path / data.val_path")
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist; fix data.path / data.val_path")
    records, skipped = [], []
    # Read as bytes, split at b"\n" only and decoded line by line: a line in another encoding is then named (or
    # skipped) like any malformed line, and U+2028 or U+2029, which JSON allows raw inside strings, end no line.
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = _decode(raw, where)
                if not line.strip():
                    continue
                records.append(_parse_line(line, fmt, where))
            except ConfigError as e:
                if bad_lines == "fail":
                    raise ConfigError(f"{e}; fix the line or set data.bad_lines=skip") from None
                skipped.append(number)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        log.warning(f"{path}: skipped {len(skipped)} malformed line(s) (data.bad_lines=skip): line {shown}")
    if not records:
        raise ConfigError(f"{path} has no usable {fmt} examples")
    return records


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: drops the byte-order mark Notepad and PowerShell write
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start} of the line); "
                          "convert the file to UTF-8") from None


def _parse_line(line: str, fmt: str, where: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:  # json's decoder recurses once per nested [ or {
        raise ConfigError(f"{where}: not valid chat data (JSON nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if fmt == "preference":
        return _preference_record(obj, where)
    if "messages" in obj:
        messages = check_messages(obj["messages"], where)
    elif "instruction" in obj and "output" in obj:
        # a missing or null input is none; any other non-string (0, []) is a mistake, which `or ""` hid
        fields = [obj["instruction"], "" if obj.get("input") is None else obj["input"], obj["output"]]
        if not all(isinstance(v, str) for v in fields):
            raise ConfigError(f"{where}: instruction, input and output must be strings")
        user = fields[0] + (f"\n\n{fields[1]}" if fields[1] else "")
        messages = check_messages([{"role": "user", "content": user}, {"role": "assistant", "content": fields[2]}],
                                  where)
    else:
        raise ConfigError(f'{where}: expected {{"messages": [...]}} or {{"instruction", "input", "output"}}')
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise ConfigError(f"{where}: message {i} is an empty assistant turn; there is nothing to learn from it")
    return {"messages": messages}


def _preference_record(obj: dict, where: str) -> dict:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise ConfigError(f"{where}: a preference pair needs prompt, chosen and rejected; {', '.join(missing)} missing")
    prompt = obj["prompt"]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prompt = check_messages(prompt, where)
    replies = {}
    for key in ("chosen", "rejected"):
        reply = obj[key]
        if isinstance(reply, list) and len(reply) == 1 and isinstance(reply[0], dict):  # [{"role": "assistant", ...}]
            reply = reply[0].get("content")
        if not isinstance(reply, str) or not reply.strip():
            raise ConfigError(f"{where}: {key} must be a non-empty reply text")
        check_encodable(reply, f"{where}: {key}")
        replies[key] = reply
    return {"prompt": prompt, **replies}


# ------------------------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One training sequence: inputs ``x`` and targets ``y`` (y[t] is the token after x[t], or IGNORE_INDEX)."""

    x: list[int]
    y: list[int]


def encode_example(
    chat: ChatFormat, messages: Sequence[Message], seq_len: int, overlong: str
) -> tuple[Example | None, bool]:
    """A conversation as (inputs, targets) of at most ``seq_len`` each, and whether it was too long. The example
    is None when ``overlong`` drops it: too long under ``drop``, or truncated until no reply token was left."""
    ids, trained = chat.encode_to_last_reply(messages)
    too_long = len(ids) > seq_len + 1
    if too_long and overlong == "drop":
        return None, True
    return _example(ids, trained, seq_len + 1), too_long


def encode_pair(
    chat: ChatFormat, record: dict, seq_len: int, overlong: str
) -> tuple[tuple[Example, Example] | None, bool]:
    """A preference record as (chosen, rejected) examples of at most ``seq_len`` each, and whether it was too long.

    Truncating a pair cuts its prompt from the start, by the same tokens for both replies, to make room for the
    longer one: the end of the prompt is what the replies answer, and the replies are what DPO scores (TRL's
    ``keep_end``). Cutting the end instead, as for SFT, lost the replies, and the pair with them. The prompt keeps at
    least half of the ``seq_len + 1`` tokens (or all of its own, if fewer); a reply longer than the room left is cut at
    its end. The pair is None when ``overlong`` drops it."""
    limit = seq_len + 1
    prompt, prompt_trained = chat.encode(record["prompt"])
    replies = [chat.encode_to_last_reply([{"role": "assistant", "content": record[key]}])
               for key in ("chosen", "rejected")]
    longest = max(len(ids) for ids, _ in replies)
    too_long = len(prompt) + longest > limit
    if too_long:
        if overlong == "drop":
            return None, True
        cut = len(prompt) - max(limit - longest, min(len(prompt), limit // 2))
        prompt, prompt_trained = prompt[cut:], prompt_trained[cut:]
    chosen, rejected = (_example(prompt + ids, prompt_trained + trained, limit) for ids, trained in replies)
    return (None if chosen is None or rejected is None else (chosen, rejected)), too_long


def _example(ids: list[int], trained: list[bool], limit: int) -> Example | None:
    """(inputs, targets) of the first ``limit`` ids; None if no trained token is left among the targets."""
    ids, trained = ids[:limit], trained[:limit]
    y = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], trained[1:], strict=True)]
    if all(t == IGNORE_INDEX for t in y):
        return None
    return Example(ids[:-1], y)


def encode_all(chat: ChatFormat, records: list[dict], cfg: ChatDataConfig, what: str) -> list:
    """Encode every record (sft: an Example; preference: a (chosen, rejected) pair of Examples) and log how many
    the overlong rule changed."""
    items, too_long = [], 0
    for r in records:
        if cfg.format == "sft":
            item, long = encode_example(chat, r["messages"], cfg.seq_len, cfg.overlong)
        else:
            item, long = encode_pair(chat, r, cfg.seq_len, cfg.overlong)
        too_long += long
        if item is not None:
            items.append(item)
    if too_long:
        lost = len(records) - len(items)
        action = "dropped" if cfg.overlong == "drop" else f"truncated, {lost} of them dropped: no reply token left"
        log.warning(f"{what}: {too_long} of {len(records)} examples are longer than data.seq_len+1={cfg.seq_len + 1} "
                    f"tokens ({action}; data.overlong={cfg.overlong})")
    if not items:
        raise ConfigError(f"{what}: no example fits data.seq_len={cfg.seq_len}; raise data.seq_len")
    if cfg.format == "preference":  # a pair whose replies are one text has a zero gradient: DPO learns nothing
        same = sum(r["chosen"] == r["rejected"] for r in records)
        if same == len(records):
            raise ConfigError(f"{what}: in every pair, chosen and rejected are the same reply, so DPO has nothing to "
                              "learn; check the file's chosen and rejected fields")
        if same:
            log.warning(f"{what}: {same} of {len(records)} pairs have the same chosen and rejected reply (they teach "
                        "nothing)")
    return items


def pack_examples(examples: list[Example], seq_len: int) -> list[list[Example]]:
    """Group examples, in order, into rows of at most ``seq_len`` tokens (next-fit: start a new row when the next
    example does not fit). Simple and order-preserving; the examples arrive shuffled, so rows mix freely."""
    rows, row, used = [], [], 0
    for ex in examples:
        if row and used + len(ex.x) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(ex)
        used += len(ex.x)
    if row:
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Datasets and batches
# ------------------------------------------------------------------------------------------------------------------
class EpochShuffled(Dataset):
    """Sample ``k`` = item ``permutation(seed, k // N)[k % N]``: a fresh order every epoch, any sample recomputable
    from its index alone (exact resume, disjoint DDP ranks through StepBatchSampler)."""

    def __init__(self, items: list, seed: int) -> None:
        self.items, self.seed = items, seed
        self._epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        return np.iinfo(np.int64).max

    def __getitem__(self, k: int):
        epoch, i = divmod(k, len(self.items))
        if epoch != self._epoch:  # one permutation per epoch, computed when the epoch starts
            self._epoch, self._order = epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.items))
        return self.items[int(self._order[i])]


def collate_examples(items: list, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (x, y) for a list of Examples, of packed rows (lists of Examples: adds segment_ids), or of
    preference pairs (chosen rows first, then rejected rows). Padding comes after every real token, so causal
    attention never lets it change a real token's logits; its targets are IGNORE_INDEX."""
    if isinstance(items[0], tuple):  # preference pairs: one batch of 2B rows, chosen then rejected
        return collate_examples([c for c, _ in items] + [r for _, r in items], pad_id)
    rows = [row if isinstance(row, list) else [row] for row in items]
    width = max(sum(len(ex.x) for ex in row) for row in rows)
    x = torch.full((len(rows), width), max(pad_id, 0), dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: a segment of its own
    for b, row in enumerate(rows):
        start = 0
        for s, ex in enumerate(row):
            end = start + len(ex.x)
            x[b, start:end], y[b, start:end], segments[b, start:end] = torch.tensor(ex.x), torch.tensor(ex.y), s
            start = end
    packed = isinstance(items[0], list)
    return (x, y, segments) if packed else (x, y)


def unscored(item: Example | tuple[Example, Example]) -> Example | tuple[Example, Example]:
    """An example (or preference pair) with no target to score: :class:`RankShare`'s blank item for chat data."""
    if isinstance(item, tuple):
        return tuple(unscored(ex) for ex in item)
    return Example(item.x, [IGNORE_INDEX] * len(item.y))


def _counted_targets(item: Example | list[Example]) -> int:
    """The targets the loss counts in an example or a packed row of them."""
    return sum(t != IGNORE_INDEX for ex in (item if isinstance(item, list) else [item]) for t in ex.y)


class ChatDataModule(StepDataModule):
    """SFT conversations or DPO preference pairs from ``cfg``, encoded with ``tokenizer`` (the model's own)."""

    same_tokens_every_step = False  # counted from one batch's width, train/tokens went down between steps

    def __init__(self, cfg: ChatDataConfig, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.chat = ChatFormat(tokenizer)
        self.train_items: list | None = None
        self.val_items: list | None = None
        # Per training sample (EpochShuffled over per-item values, with the training items' seed and length, so
        # sample k's value is sample k's): the targets the loss counts (sft only), the examples it holds (packed:
        # several)
        self._sample_targets: EpochShuffled | None = None
        self._sample_examples: EpochShuffled | None = None

    def prepare_data(self) -> None:
        """Read, check and encode the data (the demo task's files are built on first use)."""
        if self.train_items is not None:
            return
        train_path, val_path = self._paths()
        train = read_records(train_path, self.cfg.format, self.cfg.bad_lines)
        if val_path is not None:
            val = read_records(val_path, self.cfg.format, self.cfg.bad_lines)
        else:  # hold out a seeded share of the training file
            order = np.random.default_rng(self.cfg.seed).permutation(len(train))
            n_val = max(1, round(self.cfg.val_fraction * len(train)))
            if n_val >= len(train):
                raise ConfigError(f"{train_path} has {len(train)} example(s): too few to hold some out; give "
                                  "data.val_path")
            val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
        self.train_items = encode_all(self.chat, train, self.cfg, f"{train_path} (train)")
        self.val_items = encode_all(self.chat, val, self.cfg, f"{val_path or train_path} (validation)")
        if self.cfg.pack:
            shuffled = [self.train_items[i] for i in np.random.default_rng(self.cfg.seed).permutation(
                len(self.train_items))]
            rows = pack_examples(shuffled, self.cfg.seq_len)
            fill = sum(len(ex.x) for ex in self.train_items) / (len(rows) * self.cfg.seq_len)
            log.info(f"packed {len(self.train_items)} training examples into {len(rows)} rows of "
                     f"{self.cfg.seq_len} tokens ({fill:.0%} filled)")
            self.train_items = rows
        if self.cfg.format == "sft":
            self._sample_targets = EpochShuffled([_counted_targets(item) for item in self.train_items], self.cfg.seed)
        self._sample_examples = EpochShuffled([len(item) if isinstance(item, list) else 1 for item in self.train_items],
                                              self.cfg.seed)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # every rank holds the encoded examples (small next to the model)

    def state_dict(self) -> dict[str, Any]:
        """Beyond the counting settings, what decides sample k here: whether rows are packed, and which examples
        there are (the file, its held-out share, lines skipped, overlong ones cut or dropped), told by their count.
        A resume under others went on silently, on other samples than the run's next ones."""
        return {**super().state_dict(), "data.pack": self.cfg.pack, "data.overlong": self.cfg.overlong,
                "training rows (examples, or rows packed with them)": len(self.train_items)}

    def _paths(self) -> tuple[Path, Path | None]:
        """The training file and the held-out one (None: split off the training file). data.path=null is the demo
        task's training file, and its held-out file unless data.val_path gives one (it was ignored there)."""
        val = None if self.cfg.val_path is None else Path(self.cfg.val_path).expanduser()
        if self.cfg.path is None:
            from llmfoundry_pl.data.demo_task import demo_set_dir

            folder = demo_set_dir(Path(self.cfg.cache_dir).expanduser())
            kind = "sft" if self.cfg.format == "sft" else "preference"
            return folder / f"{kind}_train.jsonl", val or folder / f"{kind}_val.jsonl"
        return Path(self.cfg.path).expanduser(), val

    def train_dataloader(self) -> DataLoader:
        first, count = remaining_micro_batches(self.trainer, "fine-tuning, like pretraining, is step-based")
        sampler = StepBatchSampler(first, count, self.cfg.batch_size, self.trainer.global_rank,
                                   self.trainer.world_size)
        return self._loader(EpochShuffled(self.train_items, self.cfg.seed), batch_sampler=sampler)

    def targets_in_step(self, step: int) -> int | None:
        """The reply tokens the loss counts in optimizer step ``step``, over its ``accumulate_grad_batches``
        micro-batches on every rank. :class:`~llmfoundry_pl.lit_module.LitLlama` weighs each micro-batch's loss by
        its share of them, so that a step's loss is the mean over all of the step's reply tokens however the step is
        split into micro-batches and ranks. None for preference pairs: every micro-batch holds ``batch_size`` of
        them, and a pair, not a token, is the unit of the DPO loss."""
        if self._sample_targets is None:
            return None
        return sum(self._sample_targets[k] for k in self._samples_of_steps(step, step + 1))

    def examples_in_steps(self, first: int, end: int) -> int:
        """The examples (or preference pairs) optimizer steps ``first`` .. ``end - 1`` trained on, over all their
        micro-batches and ranks: ``batch_size`` per micro-batch, or more where rows are packed."""
        return sum(self._sample_examples[k] for k in self._samples_of_steps(first, end))

    def _samples_of_steps(self, first: int, end: int) -> range:
        """The sample indices of optimizer steps ``first`` .. ``end - 1``. StepBatchSampler gives micro-batch b on
        rank r the samples from (b·W + r)·B on, so step s's micro-batches (b = s·A ... s·A + A - 1) on all ranks
        hold samples s·A·W·B ... (s + 1)·A·W·B - 1, back to back."""
        per_step = self.trainer.accumulate_grad_batches * self.trainer.world_size * self.cfg.batch_size
        return range(first * per_step, end * per_step)

    def val_dataloader(self) -> DataLoader:
        share = RankShare(self.val_items, self.trainer, unscored, "examples",
                          "give more of them (data.val_path, or a larger data.val_fraction)")
        return self._loader(share, batch_size=self.cfg.batch_size)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        return super()._loader(dataset, collate_fn=partial(collate_examples, pad_id=self.tokenizer.pad_id), **kwargs)
