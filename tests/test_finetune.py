"""Fine-tuning: the chat template, loss masking, JSONL checks, packing, LoRA and DPO — units first, then the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from llmfoundry_pl.chat import HF_CHAT_TEMPLATE, ChatFormat, render
from llmfoundry_pl.config import ChatDataConfig, ConfigError, LoraConfig, ModelConfig
from llmfoundry_pl.data.chat import (
    ChatDataModule,
    EpochShuffled,
    Example,
    collate_examples,
    encode_all,
    encode_example,
    pack_examples,
    read_records,
    unscored,
)
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.data.datamodule import IGNORE_INDEX
from llmfoundry_pl.inference.scoring import sequence_log_probs
from llmfoundry_pl.inference.text import encode_prompt
from llmfoundry_pl.lit_module import LitDPO, LitLlama
from llmfoundry_pl.lora import merge_lora
from llmfoundry_pl.metrics import PreferenceMetrics
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import Tokenizer, train_tokenizer
from tests.conftest import TINY, run_cli
from tests.helpers.gloo import InRootForward, run_on_gloo_ranks, shard_by_block

CONVERSATION = [
    {"role": "system", "content": "Answer with a title."},
    {"role": "user", "content": "Which play?\n\nPROSPERO.\nNo harm."},
    {"role": "assistant", "content": "The Tempest"},
    {"role": "user", "content": "And 多谢 🙂?"},
    {"role": "assistant", "content": "Twelfth Night"},
]

ON_CPU = SimpleNamespace(root_device=torch.device("cpu"))  # a stand-in trainer's strategy


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = (bundled_corpus_dir() / "tempest_gut.txt").read_text().splitlines()
    return train_tokenizer([line for line in lines if line], vocab_size=400)


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


def tiny_model(vocab_size: int, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**dict(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                             max_seq_len=96), **kw}))


# ----------------------------------------------------------------------------------------------------------------
# The chat template
# ----------------------------------------------------------------------------------------------------------------
def test_chat_template_encodes_as_its_rendered_text(tokenizer, chat):
    ids, trained = chat.encode(CONVERSATION)
    assert ids == tokenizer.encode(render(CONVERSATION))  # piecewise encoding == encoding the whole text
    assert len(trained) == len(ids)
    assert chat.prompt_ids(CONVERSATION[:2]) == tokenizer.encode(render(CONVERSATION[:2], add_generation_prompt=True))


def test_a_prompt_conversation_is_checked_as_chat_data_is(tokenizer, chat):
    # A role the template lacks (OpenAI's "developer", from Python; lfpl-serve maps it to system) was a bare KeyError
    with pytest.raises(ConfigError, match="the prompt: message 0 has role 'developer'; use one of system, user, "):
        encode_prompt(tokenizer, [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                      chat)
    # An empty earlier reply is a conversation to continue (a chat whose model answered nothing), not training data
    asked = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "?"}]
    assert encode_prompt(tokenizer, tuple(asked), chat)[0] == chat.prompt_ids(asked)


def test_loss_masking_trains_on_replies_and_their_end_token_only(tokenizer, chat):
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Ariel"}]
    example, too_long = encode_example(chat, messages, seq_len=64, overlong="truncate")
    assert not too_long
    # By hand: <|user|> Who? <|end|> \n <|assistant|> Ariel <|end|>, and not the \n after it: no target, it only
    # took a place of the context (and made an example whose replies fit count as too long)
    role = tokenizer.sp.piece_to_id
    ids = [role("<|user|>"), *tokenizer.encode("Who?"), chat.end_id, *tokenizer.encode("\n"),
           role("<|assistant|>"), *tokenizer.encode("Ariel"), chat.end_id]
    reply = tokenizer.encode("Ariel") + [chat.end_id]
    first = ids.index(role("<|assistant|>"))  # that position predicts the reply's first token
    assert example.x == ids[:-1] and example.y == [IGNORE_INDEX] * first + reply
    assert encode_example(chat, messages, seq_len=len(ids) - 1, overlong="drop") == (example, False)


def test_training_loss_is_the_mean_over_reply_tokens(tokenizer, chat):
    examples = [encode_example(chat, CONVERSATION, 96, "truncate")[0],
                encode_example(chat, CONVERSATION[1:3], 96, "truncate")[0]]
    x, y = collate_examples(examples, tokenizer.pad_id)
    lit = LitLlama(tiny_model(tokenizer.vocab_size).config, network=tiny_model(tokenizer.vocab_size))
    logits = lit.model(x)
    scored = [(b, t) for b in range(2) for t in range(x.shape[1]) if y[b, t] != IGNORE_INDEX]
    by_hand = torch.stack([F.cross_entropy(logits[b, t], y[b, t]) for b, t in scored]).mean()
    lit.log = lambda *a, **k: None  # no Trainer attached: skip logging
    lit._trainer = type("T", (), {"log_every_n_steps": 10**9, "global_step": 0, "datamodule": None,
                                  "accumulate_grad_batches": 1, "world_size": 1})()
    torch.testing.assert_close(lit.training_step((x, y), 0), by_hand)
    # 2 replies in the first conversation, 1 in the second, each its tokens + <|end|>
    assert len(scored) == sum(len(tokenizer.encode(r)) + 1 for r in ("The Tempest", "Twelfth Night", "The Tempest"))


def test_chat_template_matches_the_exported_hugging_face_tokenizer(tokenizer, chat, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from llmfoundry_pl.interop import save_hf

    save_hf(tiny_model(tokenizer.vocab_size), tokenizer, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.chat_template == HF_CHAT_TEMPLATE
    for messages, open_reply in [(CONVERSATION, False), (CONVERSATION[:4], True)]:
        hf_ids = hf.apply_chat_template(messages, add_generation_prompt=open_reply, tokenize=True)
        hf_ids = hf_ids if isinstance(hf_ids, list) else hf_ids["input_ids"]
        assert hf_ids == chat.encode(messages, add_generation_prompt=open_reply)[0]


@pytest.mark.parametrize(("setting", "message"), [({"r": 0}, "lora.r=0 must be positive"),
                                                  ({"alpha": 0.0}, "lora.alpha=0.0 must be positive"),
                                                  ({"dropout": 1.0}, r"lora.dropout=1.0 must be in \[0, 1\)")])
def test_lora_settings_that_would_learn_nothing_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(enabled=True, **setting)


def test_tokenizer_without_chat_tokens_is_refused():
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["to be or not to be, that is the question"] * 50),
                                   model_writer=buffer, model_type="bpe", vocab_size=30, minloglevel=2)
    with pytest.raises(ConfigError, match="no <\\|system\\|>.*reserves them"):
        ChatFormat(Tokenizer(buffer.getvalue()))


# ----------------------------------------------------------------------------------------------------------------
# JSONL data: shapes, bad lines, long examples, packing, order
# ----------------------------------------------------------------------------------------------------------------
def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_adapters_whose_base_was_replaced_say_so(tokenizer, tmp_path):
    # The error was init_network's, for lfpl-train: "or override: model.dim=..." (lfpl-generate has no model.*)
    pytest.importorskip("transformers")
    from llmfoundry_pl.cli.common import _adapter_base
    from llmfoundry_pl.interop import save_hf

    save_hf(tiny_model(tokenizer.vocab_size, dim=64), tokenizer, tmp_path / "base")
    trained_on = dataclasses.asdict(tiny_model(tokenizer.vocab_size).config)
    with pytest.raises(ConfigError, match=r"ckpt_path=lora.ckpt holds LoRA adapters of another base model than "
                                          r"init_from=.*base holds now .*; put their base back at that path"):
        _adapter_base({"init_from": str(tmp_path / "base"), "model": trained_on}, "lora.ckpt", "ckpt_path")


def test_instruction_lines_become_conversations(tmp_path):
    instruction = {"instruction": "Name a play.", "input": "A comedy.", "output": "Twelfth Night"}
    path = write_jsonl(tmp_path / "d.jsonl", [instruction, {"messages": CONVERSATION}])
    first, second = read_records(path, "sft", "fail")
    assert first["messages"] == [{"role": "user", "content": "Name a play.\n\nA comedy."},
                                 {"role": "assistant", "content": "Twelfth Night"}]
    assert second["messages"] == CONVERSATION
    without_input = write_jsonl(tmp_path / "n.jsonl", [{**instruction, "input": None}])
    assert read_records(without_input, "sft", "fail")[0]["messages"][0]["content"] == "Name a play."
    for not_text in (0, [], 5):  # 0 and [] were taken for no input
        path = write_jsonl(tmp_path / "bad.jsonl", [{**instruction, "input": not_text}])
        with pytest.raises(ConfigError, match="instruction, input and output must be strings"):
            read_records(path, "sft", "fail")
    with pytest.raises(ConfigError, match=f"data file {tmp_path} is a folder; give a .jsonl file in data.path"):
        read_records(tmp_path, "sft", "fail")  # it said "does not exist"


@pytest.mark.parametrize(("line", "reason"), [
    ("{not json", "not valid JSON"),
    ('{"messages": ' + "[" * 5000 + "]" * 5000 + "}", "JSON nested too deeply"),  # was a RecursionError, not skipped
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}, "message 0 has no role"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"text": "hello"}, "expected"),
    ('{"messages": [{"role": "user", "content": "hi \\ud83d"}, {"role": "assistant", "content": "yo"}]}',
     r"message 0: character 4 is U\+D83D"),  # an emoji cut in two: the tokenizer's traceback, not skipped
])
def test_malformed_lines_name_their_line_number_or_are_skipped(tmp_path, caplog, line, reason):
    good = {"messages": CONVERSATION[1:3]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, line, good])
    with pytest.raises(ConfigError, match=f"d.jsonl:3: .*{reason}.*data.bad_lines=skip"):
        read_records(path, "sft", "fail")
    assert len(read_records(path, "sft", "skip")) == 3
    assert "skipped 1 malformed line(s) (data.bad_lines=skip): line 3" in caplog.text


def test_lines_that_are_not_utf8_name_their_line_number_or_are_skipped(tmp_path, caplog):
    good = json.dumps({"messages": CONVERSATION[1:3]}, ensure_ascii=False)
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{good}\n{good}\n".encode() + good.replace("PROSPERO", "PROSPÉRO").encode("latin-1") + b"\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:3: not UTF-8 text \(byte 0xc9 .*convert the file to UTF-8"):
        read_records(path, "sft", "fail")
    assert len(read_records(path, "sft", "skip")) == 2
    assert "skipped 1 malformed line(s) (data.bad_lines=skip): line 3" in caplog.text


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    # Notepad and PowerShell write one; U+2028 inside a string (json.dumps(ensure_ascii=False)) does not end a line
    conversation = [{"role": "user", "content": "Which\u2028play?"}, {"role": "assistant", "content": "The Tempest"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n" for _ in range(3)),
                    encoding="utf-8-sig")
    assert [r["messages"] for r in read_records(path, "sft", "skip")] == [conversation] * 3
    assert len(read_records(path, "sft", "fail")) == 3


def test_preference_lines_need_all_three_fields(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Which play?", "chosen": "The Tempest", "rejected": "Othello"},
                                              {"prompt": "Which play?", "chosen": "The Tempest"}])
    with pytest.raises(ConfigError, match="p.jsonl:2: .*rejected missing"):
        read_records(path, "preference", "fail")
    (record,) = read_records(path, "preference", "skip")
    assert record["prompt"] == [{"role": "user", "content": "Which play?"}]


def test_pairs_whose_replies_are_the_same_are_counted_and_all_of_them_refused(chat, caplog):
    # They have a zero gradient: a file of such pairs trained to val/loss 0.6931 and pref_acc 0.5, exit 0
    pair = {"prompt": [{"role": "user", "content": "Which play?"}], "chosen": "The Tempest", "rejected": "Othello"}
    same = {**pair, "rejected": "The Tempest"}
    cfg = ChatDataConfig(format="preference", seq_len=48)
    assert len(encode_all(chat, [pair, same], cfg, "test")) == 2
    assert "1 of 2 pairs have the same chosen and rejected reply" in caplog.text
    with pytest.raises(ConfigError, match="in every pair, chosen and rejected are the same reply"):
        encode_all(chat, [same, same], cfg, "test")


def test_long_examples_are_truncated_or_dropped_and_counted(chat, caplog):
    long = [{"role": "user", "content": "Who? " * 40}, {"role": "assistant", "content": "Ariel"}]
    reply_cut = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Ariel " * 40}]
    short = CONVERSATION[1:3]
    records = [{"messages": m} for m in (long, reply_cut, short)]
    cfg = ChatDataConfig(seq_len=48, overlong="truncate")
    kept = encode_all(chat, records, cfg, "test")
    assert len(kept) == 2  # the long prompt leaves no reply token: dropped; the long reply is cut to 48
    assert max(len(ex.x) for ex in kept) == 48
    assert "2 of 3 examples are longer than data.seq_len+1=49" in caplog.text
    assert len(encode_all(chat, records, ChatDataConfig(seq_len=48, overlong="drop"), "test")) == 1


def test_a_long_preference_prompt_is_cut_from_its_start_and_the_replies_kept(chat, caplog):
    # Cut at the end, as SFT examples are, such a pair lost both replies and was dropped: DPO never saw it.
    prompt = [{"role": "user", "content": "Which play? " * 40 + "Name the play."}]
    pair = {"prompt": prompt, "chosen": "The Tempest", "rejected": "Othello, the Moor of Venice"}
    cfg = ChatDataConfig(format="preference", seq_len=48, overlong="truncate")
    ((chosen, rejected),) = encode_all(chat, [pair], cfg, "test")
    assert "1 of 1 examples are longer" in caplog.text
    prompt_ids = chat.encode(prompt)[0]
    replies = [chat.encode_to_last_reply([{"role": "assistant", "content": pair[k]}])[0]
               for k in ("chosen", "rejected")]
    keep = 49 - max(len(r) for r in replies)  # the prompt's last tokens, as many as leave room for the longer reply
    assert chosen.x == (prompt_ids[-keep:] + replies[0])[:-1]  # the same prompt end, each whole reply after it
    assert rejected.x == (prompt_ids[-keep:] + replies[1])[:-1] and len(rejected.x) == 48
    # A reply longer than the room left is cut at its end; the prompt keeps at least half of seq_len+1 tokens.
    ((chosen, rejected),) = encode_all(chat, [{**pair, "chosen": "The Tempest " * 40}], cfg, "test")
    assert len(chosen.x) == 48 and chosen.x[:24] == rejected.x[:24] == prompt_ids[-24:]
    cfg = ChatDataConfig(format="preference", seq_len=48, overlong="drop")
    with pytest.raises(ConfigError, match="no example fits"):
        encode_all(chat, [pair], cfg, "test")


def test_packing_fills_rows_in_order_up_to_seq_len_and_never_past_it():
    examples = [Example([n] * n, [n] * n) for n in (3, 4, 5, 2, 7, 1, 6, 8)]
    rows = pack_examples(examples, seq_len=8)
    assert [[len(ex.x) for ex in row] for row in rows] == [[3, 4], [5, 2], [7, 1], [6], [8]]  # next-fit, full rows
    assert [ex for row in rows for ex in row] == examples


def test_packed_rows_compute_each_example_as_if_alone(chat):
    examples = [encode_example(chat, m, 96, "truncate")[0]
                for m in (CONVERSATION[1:3], CONVERSATION[3:5], CONVERSATION)]
    rows = pack_examples(examples[:2], seq_len=96)
    assert len(rows) == 1 and rows[0] == examples[:2]
    assert pack_examples(examples, seq_len=96) == [examples[:2], examples[2:]]  # the long one starts a new row
    x, y, segments = collate_examples(rows, pad_id=chat.tokenizer.pad_id)
    model = tiny_model(chat.tokenizer.vocab_size).eval()
    packed = model(x, segment_ids=segments)
    start = 0
    for ex in examples[:2]:
        alone = model(torch.tensor([ex.x]))
        torch.testing.assert_close(packed[0, start : start + len(ex.x)], alone[0], atol=1e-5, rtol=1e-5)
        assert y[0, start : start + len(ex.x)].tolist() == ex.y
        start += len(ex.x)


def test_example_order_is_a_fresh_permutation_each_epoch_and_reproducible():
    items = [Example([i], [i]) for i in range(7)]
    data = EpochShuffled(items, seed=3)
    epochs = [[data[k].x[0] for k in range(e * 7, e * 7 + 7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs) and epochs[0] != epochs[1]
    assert [EpochShuffled(items, seed=3)[k].x[0] for k in range(14, 21)] == epochs[2]  # any index, any time


def _replies_of_many_lengths(path: Path, n: int) -> None:
    """``n`` SFT examples with replies from 1 to many tokens: micro-batches then count very different numbers of
    reply tokens."""
    lines = [{"messages": [{"role": "user", "content": f"Say {i}."},
                           {"role": "assistant", "content": " ".join(["No harm."] * (1 + 2 * (i % 5)))}]}
             for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _chat_data(tmp_path: Path, tokenizer: Tokenizer, batch_size: int, pack: bool = False) -> ChatDataModule:
    _replies_of_many_lengths(tmp_path / "train.jsonl", 12)
    cfg = ChatDataConfig(path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "train.jsonl"), seq_len=96,
                         batch_size=batch_size, pack=pack)
    return ChatDataModule(cfg, tokenizer)


def test_a_resume_under_other_chat_data_is_refused(tokenizer, tmp_path):
    """Packing, cutting or another file change which sample k is; a resume under them went on silently."""
    counting = SimpleNamespace(accumulate_grad_batches=1, world_size=1)
    dm = _chat_data(tmp_path, tokenizer, batch_size=2)
    dm.prepare_data()
    dm.trainer = counting
    saved = dm.state_dict()
    dm.load_state_dict(saved)  # the same data resumes
    packed = _chat_data(tmp_path, tokenizer, batch_size=2, pack=True)
    packed.prepare_data()
    packed.trainer = counting
    with pytest.raises(ConfigError, match=r"data.pack: False → True; training rows \(examples, or rows packed with "
                                          r"them\): 12 → \d+\): resumed, it would train on other samples"):
        packed.load_state_dict(saved)
    _replies_of_many_lengths(tmp_path / "train.jsonl", 13)  # another file under the same name
    grown = ChatDataModule(dm.cfg, tokenizer)
    grown.prepare_data()
    grown.trainer = counting
    with pytest.raises(ConfigError, match=r"training rows \(examples, or rows packed with them\): 12 → 13"):
        grown.load_state_dict(saved)


def test_without_a_val_path_a_seeded_share_of_the_examples_is_held_out(tokenizer, tmp_path):
    _replies_of_many_lengths(tmp_path / "train.jsonl", 40)
    splits = []
    for seed, fraction in ((0, 0.1), (0, 0.1), (1, 0.1), (0, 0.25)):
        dm = ChatDataModule(ChatDataConfig(path=str(tmp_path / "train.jsonl"), seq_len=96, seed=seed,
                                           val_fraction=fraction), tokenizer)
        dm.prepare_data()
        splits.append([item.x for item in dm.val_items])
        assert len(dm.val_items) == round(fraction * 40) and len(dm.train_items) == 40 - round(fraction * 40)
        train = {tuple(item.x) for item in dm.train_items}
        assert not any(tuple(x) in train for x in splits[-1])  # no example in both
    assert splits[0] == splits[1] != splits[2]  # the seed picks them


def test_the_demo_task_validates_on_the_held_out_file_given(tokenizer, tmp_path, cache_dir):
    _replies_of_many_lengths(tmp_path / "val.jsonl", 3)  # data.val_path was ignored when data.path was null
    cfg = ChatDataConfig(val_path=str(tmp_path / "val.jsonl"), cache_dir=str(cache_dir), seq_len=96)
    dm = ChatDataModule(cfg, tokenizer)
    dm.prepare_data()
    assert len(dm.val_items) == 3 and len(dm.train_items) > 3  # the demo's training split, the file's 3 examples


@pytest.mark.parametrize("pack", [False, True])
def test_chat_data_counts_each_steps_targets_and_examples_over_every_micro_batch_and_rank(tokenizer, tmp_path, pack):
    dm = _chat_data(tmp_path, tokenizer, batch_size=2, pack=pack)
    dm.prepare_data()
    targets, examples = {}, {}  # step → reply tokens / examples in the batches the ranks' loaders give for it
    for rank in range(2):
        dm.trainer = SimpleNamespace(max_steps=5, accumulate_grad_batches=2, global_step=0, global_rank=rank,
                                     world_size=2, strategy=ON_CPU)
        for b, (_, y, *segments) in enumerate(dm.train_dataloader()):
            targets[b // 2] = targets.get(b // 2, 0) + int((y != IGNORE_INDEX).sum())
            in_rows = int((segments[0].amax(dim=1) + 1).sum()) if pack else len(y)  # packed: segments 0 .. n-1
            examples[b // 2] = examples.get(b // 2, 0) + in_rows
    assert [dm.targets_in_step(step) for step in range(5)] == [targets[step] for step in range(5)]
    assert len(set(targets.values())) > 1  # steps differ, so a wrong range of samples would show
    assert dm.examples_in_steps(1, 4) == sum(examples[step] for step in range(1, 4))
    assert (dm.examples_in_steps(1, 4) > 3 * 2 * 2 * 2) == pack  # packed rows hold several examples


@pytest.mark.parametrize(("accumulate", "ranks"), [(1, 2), (2, 2), (3, 1)])
def test_each_micro_batch_weighs_its_targets_as_one_big_batch_would(accumulate, ranks):
    # Lightning divides by the accumulation, DDP averages over the ranks: the micro-batches' scaled mean losses
    # must add up to the step's mean over all its targets. Without the ranks in the scale, the loss and gradients
    # of fine-tuning on W GPUs came out W times too small.
    counts = torch.tensor([5, 1, 9, 2, 7, 3])[: accumulate * ranks]  # reply tokens of each micro-batch of the step
    means = torch.linspace(1.0, 3.0, len(counts))
    lit = LitLlama(tiny_model(64).config, network=tiny_model(64))
    total = 0.0
    for counted, mean in zip(counts, means, strict=True):
        lit.trainer = SimpleNamespace(accumulate_grad_batches=accumulate, world_size=ranks, global_step=0,
                                      datamodule=SimpleNamespace(targets_in_step=lambda step: int(counts.sum())))
        y = torch.full((1, int(counts.max())), IGNORE_INDEX)
        y[0, :counted] = 1
        total += mean * lit._share_of_step((y, y)) / accumulate / ranks
    assert float(total) == pytest.approx(float((counts * means).sum() / counts.sum()))


def _first_step_gradients(dm: ChatDataModule, accumulate: int, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    grads = {}

    class Keep(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads.update({n: p.grad.clone() for n, p in module.named_parameters()})

    lit = LitLlama(tiny_model(tokenizer.vocab_size).config, network=tiny_model(tokenizer.vocab_size))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Keep()])
    trainer.fit(lit, datamodule=dm)
    return grads


def test_a_fine_tuning_run_logs_no_token_count_read_off_one_batch(tokenizer, tmp_path):
    # Counted as steps × one batch's width, as pretraining's windows are, train/tokens went down between steps
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    lit = LitLlama(tiny_model(tokenizer.vocab_size).config, network=tiny_model(tokenizer.vocab_size))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, log_every_n_steps=1, limit_val_batches=0, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(lit, datamodule=_chat_data(tmp_path, tokenizer, batch_size=2))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "train/loss" in columns and "train/tokens" not in columns


def test_accumulated_fine_tuning_step_has_the_gradient_of_the_whole_batch(tokenizer, tmp_path):
    halves = _chat_data(tmp_path, tokenizer, batch_size=3)
    halves.prepare_data()
    halves.trainer = SimpleNamespace(max_steps=1, accumulate_grad_batches=2, global_step=0, global_rank=0,
                                     world_size=1, strategy=ON_CPU)
    first, second = [int((y != IGNORE_INDEX).sum()) for _, y in halves.train_dataloader()]
    assert first != second  # else a mean of the two micro-batch means would be right too (133 and 91 here)
    whole = _first_step_gradients(_chat_data(tmp_path, tokenizer, batch_size=6), 1, tokenizer)
    accumulated = _first_step_gradients(_chat_data(tmp_path, tokenizer, batch_size=3), 2, tokenizer)
    for name, grad in whole.items():  # the mean over the step's reply tokens, not a mean of micro-batch means
        torch.testing.assert_close(accumulated[name], grad, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# LoRA and DPO
# ----------------------------------------------------------------------------------------------------------------
def train_adapters(model: nn.Module) -> None:
    """Give the adapters weights as training would: lora_B starts at 0, which makes each adapter a no-op."""
    seeded = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=seeded)


def test_lora_trains_only_adapters_and_merges_into_the_same_function(tokenizer):
    base = tiny_model(tokenizer.vocab_size)
    lit = LitLlama(base.config, network=tiny_model(tokenizer.vocab_size),
                   lora=LoraConfig(enabled=True, r=4, targets=["wq", "wv", "w2"]))
    trainable = {n for n, p in lit.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"wq", "wv", "w2"}
    train_adapters(lit.model)  # so that the merge has work to do
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 20))
    with_adapters = lit.model(tokens)
    assert not torch.allclose(with_adapters, base(tokens), atol=1e-4)
    merged = merge_lora(lit.model)
    assert isinstance(merged.layers[0].attention.wq, torch.nn.Linear)
    assert set(merged.state_dict()) == set(base.state_dict())  # plain names again
    torch.testing.assert_close(merged(tokens), with_adapters, atol=1e-5, rtol=1e-5)


def test_a_lora_model_of_the_python_api_is_saved_merged_only(tokenizer, tmp_path, compose_train):
    # save_hf met its adapters as a KeyError and save_safetensors wrote a folder no load could read; lfpl-export took
    # a LoRA checkpoint saved from the Python API (no run config) for a plain one: merged without merge_lora=true
    from llmfoundry_pl.cli.common import load_model
    from llmfoundry_pl.cli.export import export
    from llmfoundry_pl.interop import save_hf, save_safetensors

    base = tiny_model(tokenizer.vocab_size)
    save_safetensors(base, tokenizer, tmp_path / "base")
    lit = LitLlama(base.config, network=base, lora=LoraConfig(enabled=True, r=4), init_from=str(tmp_path / "base"))
    lit.set_tokenizer(tokenizer)
    for save in (save_hf, save_safetensors):
        with pytest.raises(ConfigError, match=r"the model holds LoRA adapters; merge them into its weights first"):
            save(lit.model, tokenizer, tmp_path / save.__name__)
        assert not (tmp_path / save.__name__).exists()
    tokens = torch.randint(0, tokenizer.vocab_size, (4, 17))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(lit, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    assert lit.hparams.run_config is None and load_model(str(tmp_path / "lora.ckpt"))[2].merged_lora
    with pytest.raises(ConfigError, match="holds LoRA adapters; merge_lora=true writes them merged"):
        export(compose_train([f"ckpt_path={tmp_path / 'lora.ckpt'}", f"out={tmp_path / 'out'}"], name="export"))
    export(compose_train([f"ckpt_path={tmp_path / 'lora.ckpt'}", f"out={tmp_path / 'out'}", "merge_lora=true"],
                         name="export"))
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_lora_resume_on_a_moved_base_is_taken_with_a_warning(tmp_path, capsys):
    # The base was refused by path: a project folder moved (or copied to another machine) could not resume.
    base = tmp_path / "base.ckpt"
    base.write_bytes(b"weights")
    network = tiny_model(300)
    lit = LitLlama(network.config, network=network, lora=LoraConfig(enabled=True, r=4),
                   init_from=str(tmp_path / "moved.ckpt"))
    saved = {"model": dataclasses.asdict(network.config), "lora": dict(lit.hparams["lora"]), "init_from": str(base)}
    with pytest.raises(ConfigError, match=f"fine-tuned from init_from={base}, not .*moved.ckpt"):
        lit._check_starting_model(saved)  # both there: another model
    base.unlink()
    lit._check_starting_model(saved)  # gone: nothing to compare with, the user's word is taken
    assert f"init_from={base}, which is gone" in capsys.readouterr().err


def test_lora_adapters_are_refused_on_other_weights_at_their_base_path(tmp_path, capsys):
    # A base replaced at its path (a recipe re-run into its fixed folder) was taken as it was: the adapters were
    # merged onto other weights without a word (held-out loss 7.9533 before, 7.5433 after)
    base = tiny_model(300)
    lit = LitLlama(base.config, network=base, lora=LoraConfig(enabled=True, r=4), init_from=str(tmp_path / "b.ckpt"))
    saved = {k: lit.hparams[k] for k in ("model", "lora", "init_from", "init_sha256")}
    assert saved["init_sha256"]
    retrained = tiny_model(300)
    with torch.no_grad():
        retrained.layers[0].attention.wq.weight.add_(1e-3)  # one matrix of its weights differs
    again = LitLlama(base.config, network=retrained, lora=LoraConfig(enabled=True, r=4), init_from=saved["init_from"])
    with pytest.raises(ConfigError, match="adapters came from other weights than init_from=.*b.ckpt holds now"):
        again._check_starting_model(saved)
    # The same weights found at another path (the folder moved): taken without a warning, there being no doubt
    moved = LitLlama(base.config, network=tiny_model(300), lora=LoraConfig(enabled=True, r=4),
                     init_from=str(tmp_path / "elsewhere.ckpt"))
    moved._check_starting_model(saved)
    assert "warning" not in capsys.readouterr().err


def test_lora_checkpoints_hold_only_the_adapters(tokenizer):
    lit = LitLlama(tiny_model(tokenizer.vocab_size).config, network=tiny_model(tokenizer.vocab_size),
                   lora=LoraConfig(enabled=True))
    checkpoint = {"state_dict": lit.state_dict()}
    lit.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(".lora_" in k for k in checkpoint["state_dict"])
    lit._fill_unsaved(checkpoint)  # on load, the base weights come back from the module (strict loading holds)
    assert set(checkpoint["state_dict"]) == set(lit.state_dict())


def _preference_pairs(chat: ChatFormat) -> list[tuple[Example, Example]]:
    return [(encode_example(chat, [*CONVERSATION[1:2], {"role": "assistant", "content": c}], 96, "drop")[0],
             encode_example(chat, [*CONVERSATION[1:2], {"role": "assistant", "content": r}], 96, "drop")[0])
            for c, r in [("The Tempest", "Othello"), ("Twelfth Night", "Hamlet")]]


def test_dpo_with_dropout_is_warned_about(chat, capsys):
    # the policy trains with dropout and the reference scores without: rewards start away from 0 (TRL turns it off)
    LitDPO(tiny_model(chat.tokenizer.vocab_size).config, network=tiny_model(chat.tokenizer.vocab_size))
    assert capsys.readouterr().err == ""
    with_dropout = tiny_model(chat.tokenizer.vocab_size, dropout=0.1)
    LitDPO(with_dropout.config, network=with_dropout)
    assert capsys.readouterr().err.startswith("warning: DPO with dropout (model.dropout=0.1) compares a policy")


def test_dpo_rewards_start_at_zero_and_accuracy_at_a_coin_toss(chat):
    pairs = _preference_pairs(chat)
    x, y = collate_examples(pairs, chat.tokenizer.pad_id)
    assert x.shape[0] == 4  # chosen rows, then rejected rows
    lit = LitDPO(tiny_model(chat.tokenizer.vocab_size).config, network=tiny_model(chat.tokenizer.vocab_size))
    chosen, rejected = lit._rewards((x, y))
    assert torch.equal(chosen, torch.zeros(2)) and torch.equal(rejected, torch.zeros(2))  # policy == reference
    metrics = PreferenceMetrics()
    metrics.update(-F.logsigmoid(chosen - rejected), chosen - rejected)
    result = metrics.compute()
    assert result["pref_acc"] == 0.5 and result["loss"] == pytest.approx(0.6931, abs=1e-4)  # ln 2
    # One step of DPO on these pairs: the chosen replies gain on the rejected ones.
    optimizer = torch.optim.SGD([p for p in lit.model.parameters() if p.requires_grad], lr=0.5)
    chosen, rejected = lit._rewards((x, y))
    (-F.logsigmoid(chosen - rejected).mean()).backward()
    optimizer.step()
    chosen, rejected = lit._rewards((x, y))
    assert (chosen - rejected).min() > 0
    # ... as the policy's own probabilities say, read apart from _rewards (rows: chosen, then rejected): with the
    # two swapped there, DPO trained towards the rejected replies and the margins above still read positive
    with torch.no_grad():
        gain = sequence_log_probs(lit.model(x), y) - sequence_log_probs(lit.reference(x), y)
    assert (gain[:2] > gain[2:]).all()
    assert not any(k.startswith("reference.") for k in _saved_keys(lit))  # the reference is rebuilt, not saved


def test_dpo_validation_skips_the_blank_pair_that_evens_out_the_ranks(chat):
    pairs = _preference_pairs(chat)
    lit = LitDPO(tiny_model(chat.tokenizer.vocab_size).config, network=tiny_model(chat.tokenizer.vocab_size))
    for p in lit.model.parameters():  # a policy apart from its reference, so that the pairs' margins differ from 0
        p.data.add_(0.05 * torch.randn_like(p))
    results = []
    for batch in (pairs, [*pairs, unscored(pairs[0])]):
        lit.validation_step(collate_examples(batch, chat.tokenizer.pad_id), 0)
        results.append(lit.val_metrics.compute())
        lit.val_metrics.reset()
    assert results[0]["reward_margin"] != 0
    torch.testing.assert_close(results[1], results[0])  # the blank pair counted nowhere, not even in the pairs


def test_dpo_with_lora_takes_its_reference_from_the_frozen_base_weights_not_a_copy(chat):
    base = tiny_model(chat.tokenizer.vocab_size, dropout=0.2).eval()
    lit = LitDPO(base.config, network=tiny_model(chat.tokenizer.vocab_size, dropout=0.2), lora=LoraConfig(enabled=True))
    assert lit.reference is None and not any(n.startswith("reference") for n, _ in lit.named_parameters())
    train_adapters(lit.model)  # the policy differs from its starting point
    x, y = collate_examples(_preference_pairs(chat), chat.tokenizer.pad_id)
    lit.train()
    torch.testing.assert_close(lit._reference_logits(x), base(x))  # adapters off and no dropout, as a frozen copy
    adapters = [p for n, p in lit.model.named_parameters() if ".lora_" in n]
    assert lit.model.training and adapters and all(p.requires_grad for p in adapters)  # the policy back as it was
    chosen, rejected = lit._rewards((x, y))
    (-F.logsigmoid(chosen - rejected).mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


def _dpo_with_lora_steps_under_fsdp(rank: int) -> None:
    """One of two ranks: a DPO+LoRA module sharded by block as trainer=fsdp shards it (fp32 here, to compare
    exactly), its training step run inside the root's forward as Lightning runs it, twice; rewards and adapter
    gradients equal the unsharded module's."""
    def build() -> LitDPO:
        lit = LitDPO(tiny_model(64).config, network=tiny_model(64), lora=LoraConfig(enabled=True, dropout=0.0))
        train_adapters(lit.model)  # the same weights on both ranks
        return lit.train()

    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    y = x.roll(-1, dims=1)
    plain = build()
    expected = torch.cat(plain._rewards((x, y)))
    (-F.logsigmoid(expected[:2] - expected[2:]).mean()).backward()
    sharded = shard_by_block(InRootForward(build(), "_rewards"), use_orig_params=True)
    for _ in range(2):  # the second step: the adapters are on and trainable again after the reference's pass
        sharded.zero_grad()
        rewards = torch.cat(sharded((x, y)))
        (-F.logsigmoid(rewards[:2] - rewards[2:]).mean()).backward()
    torch.testing.assert_close(rewards, expected)
    with FullyShardedDataParallel.summon_full_params(sharded, with_grads=True):
        grads = {n.replace("_fsdp_wrapped_module.", "").removeprefix("lit."): p.grad
                 for n, p in sharded.named_parameters() if p.grad is not None}
    adapters = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert adapters and all(".lora_" in n for n in adapters)
    for name, grad in adapters.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_dpo_with_lora_under_fsdp_trains_the_adapters_of_both_ranks(tmp_path):
    run_on_gloo_ranks(_dpo_with_lora_steps_under_fsdp, tmp_path)


def _saved_keys(lit: LitLlama) -> list[str]:
    checkpoint = {"state_dict": lit.state_dict()}
    lit.on_save_checkpoint(checkpoint)
    return list(checkpoint["state_dict"])


# ----------------------------------------------------------------------------------------------------------------
# The commands: pretrain → SFT (full and LoRA) → DPO → chat, export, resume
# ----------------------------------------------------------------------------------------------------------------
FT = ["hardware=cpu", "compile=false", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
      "data.seq_len=96", "data.batch_size=4", "trainer.max_steps=6", "trainer.val_check_interval=3",
      "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "callbacks.progress_bar=null",
      "callbacks.throughput.window_size=2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cache_dir) -> Path:
    cwd = tmp_path_factory.mktemp("pretrain")
    run_cli("train", *TINY, "data.seq_len=96", "hydra.run.dir=run", cwd=cwd)
    return cwd / "run" / "checkpoints" / "last.ckpt"


def test_sft_from_a_checkpoint_then_chat(pretrained, tmp_path):
    proc = run_cli("train", "experiment=sft", f"init_from={pretrained}", *FT, "hydra.run.dir=sft", cwd=tmp_path)
    record = json.loads((tmp_path / "sft" / "final_metrics.json").read_text())
    assert "before training: val/loss" in proc.stdout and "examples/s" in proc.stdout
    assert record["initial_metrics"]["val/loss"] > record["metrics"]["val/loss"]  # it learnt the replies
    ckpt = tmp_path / "sft" / "checkpoints" / "last.ckpt"
    refused = run_cli("eval", f"ckpt_path={ckpt}", cwd=tmp_path, check=False)  # no text split to fall back on
    assert refused.returncode == 2 and "fine-tuned on sft data" in refused.stderr
    chat = run_cli("generate", f"ckpt_path={ckpt}", "chat=true", "interactive=true", "temperature=0",
                   "max_new_tokens=5", cwd=tmp_path, input="Which play is this passage from?\nAnd this one?\n")
    assert chat.stdout.count("\n") >= 2 and "<|" not in chat.stdout  # a reply per line typed, each ended at <|end|>


def test_chat_history_drops_the_oldest_exchanges_to_fit_the_context(chat):
    from llmfoundry_pl.cli.generate import fit_context

    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": r, "content": f"message {i} " * 4} for i, r in enumerate(["user", "assistant"] * 4)]
    messages = [system, *turns[:-1]]  # ends with a user message
    full = len(chat.prompt_ids(messages))
    kept = fit_context(chat, messages, max_seq_len=full - 1)
    assert kept[0] == system and kept[-1] == messages[-1] and kept[1]["role"] == "user"
    assert len(kept) == len(messages) - 2 and len(chat.prompt_ids(kept)) < full - 1
    assert fit_context(chat, messages, max_seq_len=full + 1) == messages


def test_sft_from_a_hugging_face_folder(pretrained, tmp_path):
    from llmfoundry_pl.cli.common import load_model
    from llmfoundry_pl.interop import save_hf

    model, tokenizer, _ = load_model(str(pretrained))
    save_hf(model, tokenizer, tmp_path / "hf")  # a Llama folder transformers loads, our tokenizer.model inside
    run_cli("train", "experiment=sft", "init_from=hf", *FT, "trainer.max_steps=2", "trainer.val_check_interval=2",
            "hydra.run.dir=sft", cwd=tmp_path)
    record = json.loads((tmp_path / "sft" / "final_metrics.json").read_text())
    assert record["initial_metrics"]["val/loss"] > record["metrics"]["val/loss"]
    saved = torch.load(record["checkpoint"], weights_only=False)
    assert saved["hyper_parameters"]["init_from"] == str((tmp_path / "hf").resolve()) and "optimizer_states" in saved


def test_lora_run_resumes_exactly_and_exports_merged(pretrained, tmp_path):
    shutil.copy(pretrained, tmp_path / "base.ckpt")  # a relative init_from, recorded as an absolute path
    settings = ["experiment=sft", *FT, "lora.enabled=true", "lora.r=4", "optim.lr=1e-2"]
    lora = [*settings, "init_from=base.ckpt"]
    proc = run_cli("train", *lora, "hydra.run.dir=full", cwd=tmp_path)
    assert "is an Enum subclass" not in proc.stderr  # torch's notices on importing torchao (peft's), left out
    run_cli("train", *lora, "trainer.max_steps=3", "hydra.run.dir=half", cwd=tmp_path)
    # ckpt_path alone, as docs/fine-tuning.md says: the base comes from the init_from the checkpoint recorded (it
    # was "lora.enabled=true adapts a trained model: give it with init_from=")
    run_cli("train", *settings, "ckpt_path=half/checkpoints/last.ckpt", "hydra.run.dir=resumed", cwd=tmp_path)
    full = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert full and all(".lora_" in k for k in full)  # adapters only
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])
    # The adapters resume only onto what they were trained with: lora.alpha scales them, init_from is their base
    base = (tmp_path / "base.ckpt").resolve()
    for changed, message in ((["init_from=base.ckpt", "lora.alpha=64"], "(lora.alpha: 16.0 → 64.0); resume with its"),
                             ([f"init_from={pretrained}"], f"fine-tuned from init_from={base}, not")):
        refused = run_cli("train", *settings, *changed, "ckpt_path=half/checkpoints/last.ckpt", cwd=tmp_path,
                          check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    with pytest.raises(ConfigError, match="holds LoRA adapters only, without the weights they adapt"):
        LitLlama.load_from_checkpoint(tmp_path / "full/checkpoints/last.ckpt")  # they were put on random weights
    refused = run_cli("export", "ckpt_path=full/checkpoints/last.ckpt", "out=merged", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "merge_lora=true" in refused.stderr
    exported = run_cli("export", "ckpt_path=full/checkpoints/last.ckpt", "out=merged", "merge_lora=true",
                       "format=safetensors", cwd=tmp_path)
    assert "is an Enum subclass" not in exported.stderr
    from llmfoundry_pl.cli.common import load_model

    merged, _, _ = load_model(str(tmp_path / "merged"))
    # base + adapters, from the .ckpt, loaded from another folder than the relative init_from was given in
    adapted, _, _ = load_model(str(tmp_path / "full/checkpoints/last.ckpt"))
    tokens = torch.randint(0, merged.config.vocab_size, (1, 16))
    torch.testing.assert_close(merged(tokens), adapted(tokens))
    # the recorded base moved away: said as such, with the way out
    (tmp_path / "base.ckpt").rename(tmp_path / "moved.ckpt")
    refused = run_cli("train", *settings, "ckpt_path=half/checkpoints/last.ckpt", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and f"was fine-tuned from init_from={base}, which is not there now; put it back, " \
        "or give where it is now with init_from=" in refused.stderr


def test_dpo_run_logs_preference_metrics(pretrained, tmp_path):
    run_cli("train", "experiment=dpo", f"init_from={pretrained}", *FT, "optim.lr=3e-3", "hydra.run.dir=dpo",
            cwd=tmp_path)
    record = json.loads((tmp_path / "dpo" / "final_metrics.json").read_text())
    assert record["initial_metrics"]["val/pref_acc"] == 0.5 and record["initial_metrics"]["val/reward_margin"] == 0
    assert record["metrics"]["val/reward_margin"] != 0 and 0 <= record["metrics"]["val/pref_acc"] <= 1
    from llmfoundry_pl.cli.common import load_checkpoint

    # resumed under pretraining's settings, it went on as next-token training on the plays
    proc = run_cli("train", *FT, f"ckpt_path={record['checkpoint']}", "trainer.max_steps=20", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 2 and "trained on preference pairs (experiment=dpo), and this run's data is text" in \
        proc.stderr
    _, lit = load_checkpoint(record["checkpoint"])  # a DPO checkpoint loads as LitDPO, policy weights inside
    assert isinstance(lit, LitDPO) and lit.dpo_cfg.beta == 0.1
    saved = torch.load(record["checkpoint"], weights_only=False)["state_dict"]
    torch.testing.assert_close(lit.model.output.weight, saved["model.output.weight"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["experiment=sft"], "give the one to start from with init_from="),
    (["experiment=sft", "init_from=PRETRAINED", "model.dim=64"], "different model from model=: dim 32 vs 64"),
    (["lora.enabled=true"], "lora.enabled=true adapts a trained model"),
    (["experiment=sft", "init_from=PRETRAINED", "data.path=missing.jsonl"], "missing.jsonl does not exist"),
    (["experiment=sft", "init_from=nowhere.ckpt"], "init_from=nowhere.ckpt does not exist"),
    # before the data is read (a missing file would be named first otherwise)
    (["experiment=dpo", "init_from=PRETRAINED", "dpo.beta=0", "data.path=missing.jsonl"], "dpo.beta=0.0 must be"),
])
def test_fine_tuning_mistakes_are_one_line(pretrained, tmp_path, overrides, message):
    overrides = [o.replace("PRETRAINED", str(pretrained)) for o in overrides]
    proc = run_cli("train", *FT, *overrides, cwd=tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr
