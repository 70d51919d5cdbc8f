"""Our SentencePiece model as the files Hugging Face's ``AutoTokenizer`` loads, tokenizing exactly as SentencePiece.

``tokenizer.json`` is written directly from the SentencePiece model (no transformers, no tokenizers needed):

- model: BPE over the same vocabulary (same ids), ``byte_fallback`` for characters outside it (emoji, rare Chinese),
  and the merges SentencePiece applies implicitly: SentencePiece BPE repeatedly joins the adjacent pair whose
  joined piece has the highest score; listing every pair (left, right) whose join is a vocabulary piece, best
  score first, makes Hugging Face's rank-ordered BPE pick the same pair at every step.
- pre-tokenizer: ``Metaspace`` that only turns spaces into "▁" (``split=false``); no normalizer, so whitespace,
  newlines and runs of spaces are kept, as SentencePiece's ``identity`` rule keeps them. Our tokenizers have no
  dummy prefix; for one that has (Llama 2's, when re-exporting an imported model) Metaspace prepends "▁" to the
  first word as Hugging Face's own Llama tokenizer does, which differs from SentencePiece only for texts that
  begin with a space or a user-defined token.
- added tokens: the user-defined pieces (``<|user|>``, ...) as non-special tokens, never split, as in
  SentencePiece; control pieces (``<s>``, ``</s>``, ``<unk>``, ``<pad>``) as special tokens, and with
  ``split_special_tokens`` typed text such as "<s>" is tokenized as characters, as SentencePiece does.
- post-processor: ``<s>`` before every text, as every training document began (``add_special_tokens=False``
  gives the bare ids, equal to ``Tokenizer.encode(text)``).

``tokenizer_config.json`` names the generic ``PreTrainedTokenizerFast``, which loads ``tokenizer.json`` as
written (the ``LlamaTokenizer`` class would rebuild the pipeline from its own defaults).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from llmfoundry_pl.chat import HF_CHAT_TEMPLATE
from llmfoundry_pl.config import ConfigError
from llmfoundry_pl.tokenizer import CHAT_TOKENS, Tokenizer

# SentencePiece piece types (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2


@dataclass
class SentencePieceSpec:
    """The parts of a SentencePiece model proto that decide how text is tokenized."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type), index = id
    model_type: int = 1  # 1 unigram, 2 BPE
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    add_dummy_prefix: bool = True  # proto2 defaults, used when a field is absent
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def read_spec(model_proto: bytes) -> SentencePieceSpec:
    """Read the pieces and the normalizer/trainer settings from a serialized SentencePiece model.

    Hand-written (a protobuf wire-format walk of a dozen lines) so that neither protobuf nor transformers
    becomes a dependency just to read four settings."""
    spec = SentencePieceSpec(pieces=[])
    for number, value in _fields(model_proto):
        if number == 1:  # repeated SentencePiece
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            spec.pieces.append((piece, score, kind))
        elif number == 2:  # TrainerSpec
            for n, v in _fields(value):
                if n == 3:
                    spec.model_type = v
                elif n == 24:
                    spec.treat_whitespace_as_suffix = bool(v)
        elif number == 3:  # NormalizerSpec
            for n, v in _fields(value):
                if n == 1:
                    spec.normalizer_name = v.decode("utf-8")
                elif n == 3:
                    spec.add_dummy_prefix = bool(v)
                elif n == 4:
                    spec.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    spec.escape_whitespaces = bool(v)
    return spec


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message: an int for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _varint(buf, i)
        elif wire_type == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire_type == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire_type == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return result, i


def check_convertible(spec: SentencePieceSpec) -> None:
    """Refuse, in one line, the SentencePiece settings that tokenizer.json below cannot reproduce exactly."""
    problems = []
    if spec.model_type != BPE_MODEL:
        problems.append("it is not a BPE model")
    if spec.normalizer_name not in ("", "identity"):
        problems.append(f"it normalizes text with the '{spec.normalizer_name}' rule")
    if spec.remove_extra_whitespaces:
        problems.append("it removes extra whitespace")
    if spec.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        problems.append("it treats whitespace unlike Llama")
    if problems:
        raise ConfigError(
            f"the tokenizer cannot be written as a Hugging Face tokenizer.json that tokenizes identically "
            f"({'; '.join(problems)}); export format=safetensors instead"
        )


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The ``tokenizer.json`` (tokenizers' serialization) equivalent to ``tokenizer``'s SentencePiece model."""
    spec = read_spec(tokenizer.model_proto)
    check_convertible(spec)
    vocab = {piece: i for i, (piece, _, _) in enumerate(spec.pieces)}
    added = [
        {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": kind != USER_DEFINED}
        for i, (piece, _, kind) in enumerate(spec.pieces) if kind in (UNKNOWN, CONTROL, USER_DEFINED)
    ]
    prepend = "first" if spec.add_dummy_prefix else "never"
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if spec.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = spec.pieces[tokenizer.bos_id][0] if tokenizer.bos_id >= 0 else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend, "split": False},
        "post_processor": _prepend_bos(bos, tokenizer.bos_id),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": spec.pieces[tokenizer.sp.unk_id()][0],
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
            "ignore_merges": False, "vocab": vocab, "merges": bpe_merges(spec),
        },
    }


def bpe_merges(spec: SentencePieceSpec) -> list[str]:
    """Every (left, right) pair of normal pieces whose concatenation is a normal piece, ordered by that piece's
    score (best first): the order in which SentencePiece's BPE would join them. Written ``"left right"``, the form
    every tokenizers release reads: the pair form ``["left", "right"]`` needs tokenizers 0.20, and transformers
    4.44, which pyproject.toml allows, pins tokenizers below it (its AutoTokenizer failed on our tokenizer.json). A
    piece holds no space (check_convertible requires escaped whitespace: "▁"), so the split is never ambiguous."""
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(spec.pieces) if kind == NORMAL}
    merges = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, i, normal[left][1], normal[right][1], left, right))
    merges.sort()
    return [f"{left} {right}" for *_, left, right in merges]


def _prepend_bos(bos: str | None, bos_id: int) -> dict | None:
    if bos is None:
        return None
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def tokenizer_config(tokenizer: Tokenizer, max_length: int) -> dict:
    """``tokenizer_config.json``: the generic fast tokenizer class (it loads tokenizer.json as written), the
    special tokens by name and, when the tokenizer has the chat tokens, the project's chat template in Jinja (so
    ``apply_chat_template`` gives the ids training used)."""
    def piece(i: int) -> str | None:
        return tokenizer.sp.id_to_piece(i) if 0 <= i < tokenizer.vocab_size else None

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.sp.unk_id()),
        "pad_token": piece(tokenizer.pad_id),
        "add_bos_token": tokenizer.bos_id >= 0,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<s>" typed in text is text, as in SentencePiece
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        **({"chat_template": HF_CHAT_TEMPLATE} if has_chat_tokens(tokenizer) else {}),
    }


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` has the chat template's tokens (every tokenizer this project trains does; an imported
    Llama's does not)."""
    return all(tokenizer.sp.piece_to_id(t) != tokenizer.sp.unk_id() for t in CHAT_TOKENS)
