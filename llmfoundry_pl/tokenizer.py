"""SentencePiece BPE tokenizer: training on a corpus, loading, and the special tokens the project reserves.

Choices that matter (and why):
- BPE with ``byte_fallback``: a character never seen in training (an emoji, a rare Chinese character) becomes its
  UTF-8 bytes instead of ``<unk>``, so every text round-trips exactly, but for two things SentencePiece reserves:
  ``▁`` (U+2581), its own mark for a space, comes back as a space (and counts as one byte in bits per byte), and
  the chat markup strings (``<|user|>``...) are read as their tokens wherever they appear (as Hugging Face
  tokenizers read special tokens in text).
- ``normalization_rule_name="identity"``, no dummy prefix, whitespace kept: decode(encode(text)) == text,
  newlines and runs of spaces included (verse and code keep their layout).
- Fixed ids for ``<unk>``=0, ``<s>``=1 (bos), ``</s>``=2 (eos), ``<pad>``=3, then chat-role tokens reserved from
  the start, so that chat fine-tuning later needs no vocabulary surgery.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm

from llmfoundry_pl.config import ConfigError, one_line
from llmfoundry_pl.files import atomic_write_bytes

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(4))


def check_encodable(text: str, where: str) -> None:
    """Refuse text that has no UTF-8 form, in one line naming ``where``: half of a character (an unpaired UTF-16
    surrogate, which a JSON ``\\ud83d`` escape of an emoji cut in two decodes to) or a byte that was not UTF-8 (in
    Python's stand-in, from a terminal or pipe in another encoding). SentencePiece failed on it with pybind11's
    "Unable to cast Python instance of type str" and no place named; the server answered 500."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}, which is not UTF-8 text" if 0xDC80 <= code <= 0xDCFF else \
            f"U+{code:04X}, half of a character (an unpaired surrogate, as an emoji cut in two leaves)"
        raise ConfigError(f"{where}: character {e.start + 1} is {what}; remove it") from None


class Tokenizer:
    """A loaded SentencePiece model, kept as its serialized bytes so it can travel inside a checkpoint."""

    def __init__(self, model_proto: bytes) -> None:
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def from_file(cls, path: str | os.PathLike, key: str | None = "data.tokenizer_path") -> Tokenizer:
        """The SentencePiece model at ``path``; a one-line error if it is none, naming the setting ``key`` that gave
        the path (None: a file no setting names, a model folder's or the chunk folder's own)."""
        path = Path(path).expanduser()
        if not path.is_file():
            what = "is a folder, not a SentencePiece .model file" if path.is_dir() else "does not exist"
            raise ConfigError(f"tokenizer file {path} {what}" + (f"; fix {key} or set it to null" if key else ""))
        model_proto = path.read_bytes()
        try:
            if not model_proto:  # SentencePiece takes empty bytes for "no model": a tokenizer of 0 tokens
                raise RuntimeError("the file is empty")
            tokenizer = cls(model_proto)
        except RuntimeError as e:
            fix = f"; point {key} at a .model file" if key else ""
            raise ConfigError(f"{path} is not a SentencePiece model ({one_line(e, 120)}){fix}") from None
        # Every document is <s> text </s> here (token files, evaluation, export): a tokenizer without one of them
        # loaded, then crashed the first command that needed its id (-1), as an OverflowError tokenizing the corpus.
        missing = [name for name, token_id in (("BOS", tokenizer.bos_id), ("EOS", tokenizer.eos_id)) if token_id < 0]
        if missing:
            fix = f"; point {key} at one" if key else ""
            raise ConfigError(f"{path} has no {' and no '.join(missing)} token: llmfoundry_pl wraps every document in "
                              f"<s> ... </s>, so it needs a tokenizer that has both{fix}")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @cached_property
    def sha256(self) -> str:
        """Identity of the tokenizer: token files and checkpoints record it to detect a mismatch."""
        return hashlib.sha256(self.model_proto).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once; SentencePiece spreads them over threads in C++ (no GIL, no processes)."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def decode_after(self, previous: int, ids: Iterable[int]) -> str:
        """The text of ``ids`` as they continue a text whose last token is ``previous`` (a prompt's). Decoded on
        their own, a tokenizer that adds a space before every text (SentencePiece's add_dummy_prefix, as Llama 2's
        does; ours do not) takes the space of a first piece "▁the" for that one and drops it: a continuation of
        "The quality of mercy" came out as "mercythe". After ``previous`` the space stays; ``previous``'s own text
        is left out. (After <s>, a text's start, the space goes, as it should.)"""
        head, text = self.decode([previous]), self.decode([previous, *ids])
        return text[len(head):] if text.startswith(head) else self.decode(ids)

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 length in bytes of the text each token id stands for (byte pieces: 1, control tokens: 0).

        Dividing the summed loss of the tokens with bytes by these bytes gives bits per byte, a number that compares
        models whose tokenizers differ (a bigger vocabulary lowers the loss per token but not per byte). The chat
        markup tokens count 0 too, like </s>: they are structure the template adds, not text. (SentencePiece calls
        them user-defined, not control: spelled out, the 7 bytes of each reply's <|end|> were a quarter of the bytes
        of the demo task's held-out replies, and fine-tuning's val/bpb read a quarter low.)"""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        markup = {self.sp.piece_to_id(t) for t in CHAT_TOKENS + RESERVED_TOKENS} - {self.sp.unk_id()}
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                lengths[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i) or i in markup):
                lengths[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths

    @cached_property
    def adds_dummy_prefix(self) -> bool:
        """Whether encoding puts a "▁" before every text (SentencePiece's add_dummy_prefix, as Llama 2's tokenizer
        does; this project's do not)."""
        return self.sp.encode("a", out_type=str)[0].startswith("\u2581")  # "▁a", or "▁" then "a"

    @cached_property
    def encodes_lines_apart(self) -> bool:
        """Whether a text cut after a newline encodes, piece by piece, to the ids of the whole: no piece of the
        vocabulary holds a newline (so no token spans one), no dummy prefix is put before each piece, and cut texts
        encode as their whole does (a normalizer such as NFKC turns a newline into a space, which is squeezed away
        at a piece's end: "Duke.\n|Good" lost the ▁ between them). True of this project's tokenizers, which train
        on lines and leave text as it is."""
        encode, cuts = self.sp.encode, (("a\n", "b"), ("a\n", " b"), ("a \n", "\nb"))
        return (not self.adds_dummy_prefix and not self._pieces_matching("\n")
                and all(encode(a) + encode(b) == encode(a + b) for a, b in cuts))

    @cached_property
    def encodes_words_apart(self) -> bool:
        """Whether a text cut before a space that follows another character ("thee| and") encodes, piece by piece,
        to the ids of the whole: no piece of the vocabulary holds a "▁" after another character (SentencePiece's
        split_by_whitespace, its default), no dummy prefix, and a piece's leading space is kept (not squeezed away,
        as remove_extra_whitespaces would). True of this project's tokenizers; what lets a text of few newlines
        (text8's 100 MB are one line) be encoded in pieces."""
        return (not self.adds_dummy_prefix and self.decode(self.encode(" a")) == " a"
                and not self._pieces_matching("[^\u2581]\u2581"))

    def _pieces_matching(self, pattern: str) -> bool:
        """Whether a piece of the vocabulary (byte pieces aside) holds a match of the regular expression."""
        found = re.compile(pattern).search
        return any(found(self.sp.id_to_piece(i)) for i in range(self.vocab_size) if not self.sp.is_byte(i))

    @cached_property
    def first_token_bytes(self) -> np.ndarray:
        """:attr:`token_bytes` for the first token of a text (the one after ``<s>``). A tokenizer that puts a "▁"
        before every text (SentencePiece's add_dummy_prefix, as Llama 2's does; ours do not) starts it with a
        space the text does not have: counted, it added a byte per document (300 short documents: bits per byte
        3% low)."""
        lengths = self.token_bytes.copy()
        if self.adds_dummy_prefix:
            for i in np.flatnonzero(lengths):
                if not self.sp.is_byte(int(i)) and self.sp.id_to_piece(int(i)).startswith("\u2581"):
                    lengths[i] -= 1
        return lengths

    def text_bytes(self, tokens: np.ndarray) -> int:
        """The bytes of text that a token stream (documents as ``<s> ... </s>``, as the token files hold them)
        stands for, counted as val/bpb counts them (:attr:`token_bytes`, :attr:`first_token_bytes` after ``<s>``).
        The text's own UTF-8 length with this project's tokenizers; fewer with one that normalizes text (NFKC),
        squeezes whitespace or maps characters to ``<unk>``. Read in slices: ``tokens`` may be a memory-mapped token
        file of any size (as int64 in one piece, a 250M-token file took 2 GB, twice)."""
        first_extra = self.first_token_bytes - self.token_bytes  # what a document's first token counts otherwise
        total, previous = 0, -1  # the token before the slice: a <s> there makes the slice's first a first token
        for start in range(0, len(tokens), _TEXT_BYTES_SLICE):
            piece = np.asarray(tokens[start : start + _TEXT_BYTES_SLICE], dtype=np.int64)
            after_bos = np.concatenate(([previous], piece[:-1])) == self.bos_id
            total += int(self.token_bytes[piece].sum() + first_extra[piece[after_bos]].sum())
            previous = piece[-1]
        return total

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(Path(path), self.model_proto)


_TEXT_BYTES_SLICE = 1 << 22  # tokens per slice in Tokenizer.text_bytes (32 MiB as int64)

# SentencePiece's trainer skips, silently, every line longer than max_sentence_length bytes: a text without line
# breaks (a scraped page, a long paragraph of Chinese) would train the tokenizer on none of its text. Long lines are
# cut into pieces that fit instead; a cut costs one word boundary per 16k characters.
_MAX_SENTENCE_BYTES = 1 << 16
_PIECE_CHARS = _MAX_SENTENCE_BYTES // 4  # UTF-8 takes at most 4 bytes per character


def _pieces_that_fit(lines: Iterable[str], failures: list[BaseException], seen: dict[str, bool]) -> Iterator[str]:
    """The lines cut to fit; an exception raised by ``lines`` is also kept in ``failures`` (see train_tokenizer),
    Ctrl-C's KeyboardInterrupt included, and ``seen["text"]`` tells whether any line held more than whitespace."""
    try:
        for line in lines:
            seen["text"] = seen["text"] or not line.isspace() and line != ""
            for start in range(0, len(line), _PIECE_CHARS):
                yield line[start : start + _PIECE_CHARS]
    except BaseException as e:  # SentencePiece made Ctrl-C while reading a "RuntimeError: INTERNAL: KeyboardInterrupt"
        failures.append(e)
        raise


# SentencePiece trains on at most this many lines (pieces of lines, see _pieces_that_fit). Past it, its own sampling
# drew them with a seed of its own choosing: a corpus of more lines gave another tokenizer in every run (three
# processes, three tokenizers), hence other token files, and a resume after the cache was cleared was refused
# ("trained with another tokenizer"). The sample is drawn here instead, with a fixed seed.
TOKENIZER_TRAINING_LINES = 2_000_000


def _seeded_sample(pieces: Iterable[str], size: int) -> Iterator[str]:
    """At most ``size`` of ``pieces``, each as likely as another to be kept (reservoir sampling, with a generator
    of fixed seed): all of them, in order, where there are no more. Each is dropped from here once handed on, as
    SentencePiece keeps its own copy."""
    kept: list[str | None] = []
    draw = random.Random(0).randrange
    for i, piece in enumerate(pieces):
        if i < size:
            kept.append(piece)
        elif (j := draw(i + 1)) < size:
            kept[j] = piece
    for i, piece in enumerate(kept):
        kept[i] = None
        yield piece


# SentencePiece's BPE model depends on the trainer's thread count (the bundled plays at 1, 2, 4 and 16 threads: four
# different tokenizers, each the same run after run). With the machine's core count, the same text and settings gave
# another tokenizer on another machine: another data, other losses, and a resume there refused ("trained with
# another tokenizer"). A fixed count gives one tokenizer everywhere; 2 keeps the ones 2-core machines made (the
# reference figures'), and costs little: BPE's merges run on one thread whatever the count (0.32 s at 1 thread,
# 0.23 s at 16 for the bundled plays).
TOKENIZER_TRAINING_THREADS = 2


def train_tokenizer(
    lines: Iterable[str], vocab_size: int, character_coverage: float = 0.9995,
    num_threads: int = TOKENIZER_TRAINING_THREADS,
) -> Tokenizer:
    """Train a SentencePiece BPE model on an iterable of text lines (see the module docstring for the options);
    the same lines and settings give the same tokenizer on any machine (:data:`TOKENIZER_TRAINING_THREADS`), and in
    every run (:data:`TOKENIZER_TRAINING_LINES`)."""
    fixed = 4 + len(CHAT_TOKENS + RESERVED_TOKENS) + 256  # <unk> <s> </s> <pad>, the markup, the byte pieces
    if vocab_size < fixed:  # 1 to 3 ended in SentencePiece's "INTERNAL: ... insert_id(pad_id)"
        raise ConfigError(f"data.vocab_size={vocab_size} is too small: a tokenizer needs {fixed} tokens before any "
                          "learned from the corpus (special tokens and the 256 bytes); raise data.vocab_size")
    buffer = io.BytesIO()
    # SentencePiece pulls the lines from C++ and turns an exception raised while reading them (a ConfigError for a
    # bad file met halfway through a lazily read corpus) into "RuntimeError: INTERNAL: ...": the original is kept
    # here and raised as itself.
    failures: list[BaseException] = []
    seen = {"text": False}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_seeded_sample(_pieces_that_fit(lines, failures, seen), TOKENIZER_TRAINING_LINES),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            user_defined_symbols=list(CHAT_TOKENS + RESERVED_TOKENS),
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=TOKENIZER_TRAINING_LINES,  # never more: _seeded_sample drew them
            shuffle_input_sentence=True,  # below the limit, a shuffle of fixed seed: kept, as are the tokenizers made
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        if not seen["text"]:  # SentencePiece's complaint was the vocabulary size (at most 271), then 0 tokens
            raise ConfigError("the corpus has no text to train a tokenizer on, only whitespace; check data.path") \
                from None
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", str(e))
        if too_high:
            raise ConfigError(
                f"data.vocab_size={too_high.group(1)} is too large for this corpus (SentencePiece allows at most "
                f"{too_high.group(2)}); lower data.vocab_size or add more text"
            ) from None
        if "sentences_.empty()" in str(e):
            raise ConfigError("the corpus has no text to train a tokenizer on; check data.path") from None
        too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if too_low:
            raise ConfigError(
                f"data.vocab_size={too_low.group(1)} is too small for this corpus (it needs at least "
                f"{too_low.group(2)}: bytes, special tokens and frequent characters); raise data.vocab_size or "
                "lower data.character_coverage"
            ) from None
        raise
    return Tokenizer(buffer.getvalue())
