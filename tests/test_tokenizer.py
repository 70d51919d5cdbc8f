import os

import pytest

from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.tokenizer import (
    BOS_ID,
    CHAT_TOKENS,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    _seeded_sample,
    train_tokenizer,
)

CHINESE = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:3] for line in f.read_text().splitlines()]
    lines += [CHINESE] * 20
    return train_tokenizer(lines, vocab_size=600)


@pytest.mark.parametrize(
    "text",
    [
        "ROMEO: But soft, what light through yonder window breaks?",
        "  two leading spaces,\n\nblank lines,\ttabs   and runs of spaces  ",
        CHINESE,
        "未见过的汉字：龘靐齉 and an emoji 🙂, accents: naïve café",
    ],
)
def test_tokenizer_round_trips_text_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_unseen_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("🙂")
    assert UNK_ID not in ids
    assert len(ids) == len("🙂".encode())  # four UTF-8 bytes, four byte pieces


def test_tokenizer_special_ids_and_chat_tokens(tokenizer):
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    for token in CHAT_TOKENS:
        assert len(tokenizer.encode(token)) == 1, token
    assert tokenizer.encode("hi", bos=True, eos=True)[0] == BOS_ID
    assert tokenizer.encode("hi", bos=True, eos=True)[-1] == EOS_ID


@pytest.mark.parametrize("text", ["Hello there, friend.\n", CHINESE, "bytes 🙂 and tokens"])
def test_tokenizer_token_bytes_add_up_to_the_utf8_length(tokenizer, text):
    assert tokenizer.token_bytes[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))
    assert tokenizer.token_bytes[[BOS_ID, EOS_ID, PAD_ID]].sum() == 0


def test_chat_markup_counts_no_bytes_of_text(tokenizer):
    # Like </s>: structure a template adds. Spelled out, a reply's <|end|> counted 7 bytes of predicted text.
    text = "<|user|>bytes 🙂<|end|>"
    assert tokenizer.token_bytes[tokenizer.encode(text)].sum() == len("bytes 🙂".encode())


@pytest.fixture(scope="module")
def llama2_like() -> Tokenizer:
    """A tokenizer as Llama 2's: it adds a "▁" (a space) before every text, SentencePiece's add_dummy_prefix."""
    import io

    import sentencepiece as spm

    lines = [line for line in (bundled_corpus_dir() / "tempest_gut.txt").read_text().splitlines() if line]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, add_dummy_prefix=True, bos_id=BOS_ID,
                                   eos_id=EOS_ID, unk_id=UNK_ID, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    return Tokenizer(model.getvalue())


def test_bytes_of_a_text_whose_tokenizer_adds_a_dummy_prefix(tokenizer, llama2_like):
    # Llama 2's tokenizer (add_dummy_prefix) starts every text with a "▁" that is not in it: counted as a byte, it
    # made bits per byte 3% low on 300 short documents. Validation counts a document's first token (after <s>) by
    # first_token_bytes, without it. Ours add no prefix: both tables are the same.
    import torch

    from llmfoundry_pl.config import ModelConfig
    from llmfoundry_pl.lit_module import LitLlama

    texts = ["Hello there, friend.", "  two spaces first", "\nnewline first", "🙂 emoji first"]
    for text in texts:
        ids = llama2_like.encode(text)
        counted = llama2_like.first_token_bytes[ids[0]] + llama2_like.token_bytes[ids[1:]].sum()
        assert counted == len(text.encode("utf-8")), (text, llama2_like.sp.id_to_piece(ids))
    assert (tokenizer.first_token_bytes == tokenizer.token_bytes).all()

    lit = LitLlama(ModelConfig(vocab_size=llama2_like.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=64))
    lit.set_tokenizer(llama2_like)
    for text in texts:  # each a document: <s> text </s>, every token scored
        ids = torch.tensor([llama2_like.encode(text, bos=True, eos=True)])
        lit.validation_step((ids[:, :-1], ids[:, 1:]), 0)
    assert int(lit.val_metrics.bytes) == sum(len(text.encode("utf-8")) for text in texts)


def test_tokenizer_survives_serialization(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "t.model")
    again = Tokenizer.from_file(tmp_path / "t.model")
    assert again.sha256 == tokenizer.sha256
    assert again.encode(CHINESE) == tokenizer.encode(CHINESE)


def test_tokenizer_rejects_a_vocab_too_large_for_the_corpus():
    with pytest.raises(ConfigError, match=r"data.vocab_size=5000 is too large .* at most \d+"):
        train_tokenizer(["tiny corpus"] * 10, vocab_size=5000)


@pytest.mark.parametrize("vocab_size", [1, 3, 267])
def test_tokenizer_rejects_a_vocab_smaller_than_its_fixed_tokens(vocab_size):
    # 1 to 3 ended in SentencePiece's "RuntimeError: INTERNAL: ... insert_id(trainer_spec_.pad_id() ...)"
    with pytest.raises(ConfigError, match=rf"^data.vocab_size={vocab_size} is too small: a tokenizer needs 268 tokens"):
        train_tokenizer(["tiny corpus"] * 10, vocab_size=vocab_size)


def test_tokenizer_from_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="is not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "bad.model")
    (tmp_path / "empty.model").write_bytes(b"")  # SentencePiece alone loads it as a tokenizer of 0 tokens
    with pytest.raises(ConfigError, match="empty.model is not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "empty.model")
    # the fix names the setting that gave the path, and none for a file no setting names (a chunk folder's own:
    # "point data.tokenizer_path at a .model file" sent users to a setting they had not used)
    with pytest.raises(ConfigError, match=r"bad.model is not a SentencePiece model \(.*\); point data.tokenizer_path"):
        Tokenizer.from_file(tmp_path / "bad.model")
    with pytest.raises(ConfigError, match=r"bad.model is not a SentencePiece model \(.*\)$"):
        Tokenizer.from_file(tmp_path / "bad.model", key=None)


def test_tokenizer_rejects_a_vocab_too_small_for_the_characters():
    with pytest.raises(ConfigError, match=r"data.vocab_size=270 is too small .* at least \d+"):
        train_tokenizer([CHINESE * 3, "abcdefghijklmnopqrstuvwxyz"] * 10, vocab_size=270, character_coverage=1.0)


def test_tokenizer_learns_from_lines_longer_than_sentencepiece_takes():
    # One line of 200k characters (~500 KB of UTF-8): SentencePiece alone skips lines over 64 KB, which left this
    # corpus with no text at all. Cut into pieces, it trains, and its frequent words become single tokens.
    tokenizer = train_tokenizer([(CHINESE + " hello world ") * 3000], vocab_size=340)
    assert len(tokenizer.encode(" hello world ")) <= 3
    assert tokenizer.decode(tokenizer.encode(CHINESE)) == CHINESE


def test_a_continuation_keeps_the_space_a_dummy_prefix_tokenizer_drops_when_decoding_it_alone(llama2_like):
    # Generated text is decoded apart from its prompt: with Llama 2's kind of tokenizer, "The quality of mercy"
    # continued as "mercyis not strained" (lfpl-generate, generate_text, lfpl-serve; and a stop string " is" never
    # matched there).
    from llmfoundry_pl.inference.text import TextStreamer

    prompt = llama2_like.encode("The quality of mercy", bos=True)
    full = llama2_like.encode("The quality of mercy is not strained", bos=True)
    new = full[len(prompt):]
    assert full[: len(prompt)] == prompt and llama2_like.decode(new) == "is not strained"
    assert llama2_like.decode_after(prompt[-1], new) == " is not strained"
    assert llama2_like.decode_after(llama2_like.bos_id, new) == "is not strained"  # at a text's start it goes
    streamer = TextStreamer(llama2_like, prompt[-1])
    assert "".join([streamer.push(i) for i in new] + [streamer.flush()]) == " is not strained"


def test_ctrl_c_while_the_corpus_is_read_stays_an_interruption():
    # SentencePiece pulls the lines from C++ and turned the KeyboardInterrupt raised in them into "RuntimeError:
    # INTERNAL: KeyboardInterrupt", a 30-line traceback where the command says "interrupted" (exit 130)
    def lines():
        yield from ["to be or not to be"] * 100
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(lines(), vocab_size=300)


def test_the_same_text_trains_the_same_tokenizer_on_machines_with_other_core_counts(monkeypatch):
    # SentencePiece's BPE result depends on its thread count, which was the machine's core count: a resume on
    # another machine was refused ("trained with another tokenizer") though the text and settings were the same.
    import os

    lines = [line for line in (bundled_corpus_dir() / "tempest_gut.txt").read_text().splitlines() if line]
    trained = {}
    for cores in (2, 8):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        trained[cores] = train_tokenizer(lines, vocab_size=600).sha256
    assert trained[2] == trained[8]
    assert train_tokenizer(lines, vocab_size=600, num_threads=8).sha256 != trained[2]  # what the count changes


# Trains with SentencePiece told to take at most 300 lines, as it is told 2,000,000: past that many, it drew them
# with a seed of its own (three processes, three tokenizers); the sample is now drawn beforehand, with a fixed seed.
_TRAIN_PAST_THE_LIMIT = """
import sentencepiece as spm
from llmfoundry_pl import tokenizer
from llmfoundry_pl.data.corpus import bundled_corpus_dir

train = spm.SentencePieceTrainer.train
spm.SentencePieceTrainer.train = lambda **kw: train(**{**kw, "input_sentence_size": 300})
tokenizer.TOKENIZER_TRAINING_LINES = 300
lines = [line for path in sorted(bundled_corpus_dir().glob("*.txt"))[:2] for line in path.read_text().splitlines()]
print(tokenizer.train_tokenizer(lines, vocab_size=400).sha256)
"""


def test_a_corpus_of_more_lines_than_the_trainer_takes_gives_one_tokenizer_in_every_run():
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _TRAIN_PAST_THE_LIMIT], capture_output=True, text=True, check=True,
                           timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout for _ in range(3)]
    assert len(set(runs)) == 1 and len(runs[0].strip()) == 64


def test_the_seeded_sample_keeps_all_lines_up_to_its_size_then_a_fixed_share():
    lines = [f"line {i}" for i in range(1000)]
    assert list(_seeded_sample(lines[:40], 50)) == lines[:40]  # all, in order: the tokenizers made before stay
    sample = list(_seeded_sample(lines, 50))
    assert len(sample) == len(set(sample)) == 50 and set(sample) <= set(lines)
    assert sample == list(_seeded_sample(iter(lines), 50)) and sample != lines[:50]  # seeded, and drawn from all
    assert max(int(line.split()[1]) for line in sample) > 500


def test_a_tokenizer_file_without_an_end_of_text_token_is_refused_when_read(tmp_path):
    # every document is <s> text </s>: data.tokenizer_path of such a model was an OverflowError tokenizing the corpus
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some text to train on"] * 50), model_writer=buffer,
                                   model_type="bpe", vocab_size=40, eos_id=-1, minloglevel=2)
    (tmp_path / "no_eos.model").write_bytes(buffer.getvalue())
    with pytest.raises(ConfigError, match=r"no_eos.model has no EOS token: llmfoundry_pl wraps every document in "
                                          r"<s> \.\.\. </s>, so it needs a tokenizer that has both; point "
                                          r"data.tokenizer_path at one$"):
        Tokenizer.from_file(tmp_path / "no_eos.model")
