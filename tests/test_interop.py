"""Hugging Face and safetensors folders: parity with transformers, exact tokenization, round trips, lfpl-export."""

from __future__ import annotations

import io
import json
import re
import stat
from pathlib import Path

import lightning as L
import pytest
import sentencepiece as spm
import torch
from hydra.errors import ConfigCompositionException
from safetensors import safe_open

from llmfoundry_pl.chat import ChatFormat
from llmfoundry_pl.cli.common import to_dataclass
from llmfoundry_pl.cli.eval import evaluate
from llmfoundry_pl.cli.export import export
from llmfoundry_pl.config import ConfigError, DataConfig, ExportConfig, ModelConfig
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.inference import generate, generate_text
from llmfoundry_pl.inference.text import encode_prompt
from llmfoundry_pl.interop import load_folder, load_hf, load_safetensors, save_hf, save_safetensors
from llmfoundry_pl.interop.folder import write_folder
from llmfoundry_pl.interop.hf import verify_hf
from llmfoundry_pl.interop.hf_tokenizer import read_spec, tokenizer_json
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import BOS_ID, CHAT_TOKENS, EOS_ID, PAD_ID, RESERVED_TOKENS, Tokenizer, train_tokenizer
from tests.conftest import run_cli

CHINESE = "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？"
MIXED_TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "  Shall I compare thee to a summer's day?\n   Thou art more lovely  and more temperate:\n\n\tRough winds",
    CHINESE,
    "未见过的汉字：龘靐齉, an emoji 🙂👍🏽, accents: naïve café, digits 2024-11-22 3.14159",
    "<|system|>Be brief.<|end|>\n<|user|>你好 🙂<|end|>\n<|assistant|> Hi!<|end|><|reserved_3|>",
    "<s> and </s> typed as text, <unk> <pad>",
    " ",
    "\n\n",
    "trailing spaces   ",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:3] for line in f.read_text().splitlines()]
    return train_tokenizer(lines + [CHINESE] * 20, vocab_size=611)  # an odd vocabulary size


def tiny_model(tokenizer: Tokenizer, seed: int = 0, **overrides) -> Transformer:
    """A random model whose logits are far from uniform (init_std 0.5), so greedy decoding is not trivial."""
    torch.manual_seed(seed)
    base = dict(vocab_size=tokenizer.vocab_size, dim=48, n_layers=2, n_heads=6, n_kv_heads=1, hidden_dim=80,
                max_seq_len=40, tie_embeddings=True, rope_theta=500.0, norm_eps=1e-6, init_std=0.5)
    return Transformer(ModelConfig(**{**base, **overrides})).eval()


def sentencepiece_model(**options) -> bytes:
    """A tiny SentencePiece BPE model trained with ``options`` over SentencePiece's defaults (not train_tokenizer's:
    no chat tokens)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["ＡＢＣ full width text"] * 50), model_writer=buffer,
                                   model_type="bpe", vocab_size=40, minloglevel=2, **options)
    return buffer.getvalue()


def same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------------
# Export to Hugging Face: transformers loads it and agrees
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_embeddings=False, n_heads=4, n_kv_heads=2, dim=64, hidden_dim=100, n_layers=3)],
    ids=["tied-mqa", "untied-gqa"],
)
def test_against_hf_llama_export_logits_and_greedy_generation(tokenizer, tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(tokenizer, **overrides)
    save_hf(ours, tokenizer, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == ours.config.tie_embeddings
    x = torch.randint(0, tokenizer.vocab_size, (3, 37))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=1e-5)
    prompt = tokenizer.encode("ROMEO: what light", bos=True)
    expected = generate(ours, prompt, 24, temperature=0)
    assert len(set(expected)) > 3  # a non-trivial continuation
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert theirs[0, len(prompt):].tolist() == expected


def test_against_hf_tokenizer_ids_and_decoding(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf(tiny_model(tokenizer), tokenizer, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in MIXED_TEXTS:
        ids = tokenizer.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text
        assert hf(text)["input_ids"] == [BOS_ID, *ids], text  # <s> first, as every training document began
        assert hf.decode(ids) == text == tokenizer.decode(ids)
    for token in CHAT_TOKENS + RESERVED_TOKENS:
        assert hf(token, add_special_tokens=False)["input_ids"] == [tokenizer.sp.piece_to_id(token)]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    # whole paragraphs of a play the tokenizer was not trained on
    paragraphs = sorted(bundled_corpus_dir().glob("*.txt"))[5].read_text().split("\n\n")[:400]
    assert hf(paragraphs, add_special_tokens=False)["input_ids"] == tokenizer.encode_batch(paragraphs)
    # merges as "left right": the pair form (["left", "right"]) needs tokenizers >= 0.20, which transformers 4.44
    # (pyproject's lowest) cannot install, and its AutoTokenizer failed on the file ("did not match any variant")
    merges = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)


def test_hf_tokenizer_reads_the_sentencepiece_proto_as_protobuf_does(tokenizer):
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = model_pb2.ModelProto.FromString(tokenizer.model_proto)
    spec = read_spec(tokenizer.model_proto)
    assert [(p, k) for p, _, k in spec.pieces] == [(p.piece, p.type) for p in proto.pieces]
    assert [s for _, s, _ in spec.pieces] == pytest.approx([p.score for p in proto.pieces])
    n = proto.normalizer_spec
    assert (spec.normalizer_name, spec.add_dummy_prefix, spec.remove_extra_whitespaces) == (
        n.name, n.add_dummy_prefix, n.remove_extra_whitespaces)
    assert spec.model_type == proto.trainer_spec.model_type == 2  # BPE


def test_hf_tokenizer_refuses_what_it_cannot_reproduce():
    # SentencePiece's defaults (NFKC normalization, squeezed whitespace, a dummy prefix) unlike train_tokenizer's
    message = "normalizes text with the 'nmt_nfkc' rule; it removes extra whitespace); export format=safetensors"
    with pytest.raises(ConfigError, match=re.escape(message)):
        tokenizer_json(Tokenizer(sentencepiece_model()))


def test_hf_export_of_a_chat_model_stops_generating_at_end(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    chat = ChatFormat(tokenizer)
    ours = tiny_model(tokenizer, tie_embeddings=False)
    with torch.no_grad():  # rigged to answer <|end|> at once: the blocks add nothing, the head reads dimension 0
        for layer in ours.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        ours.tok_embeddings.weight[:, 0] = 1.0
        ours.norm.weight.zero_()
        ours.norm.weight[0] = 1.0
        ours.output.weight.zero_()
        ours.output.weight[chat.end_id, 0] = 10.0
    save_hf(ours, tokenizer, tmp_path / "hf")
    verify_hf(tmp_path / "hf", ours, tokenizer)  # what lfpl-export verify=true runs
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = chat.prompt_ids([{"role": "user", "content": "hi"}])
    reply = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert reply == [chat.end_id]  # not <|end|> eight times: transformers stops where lfpl-generate chat=true does
    assert hf.generation_config.eos_token_id == [EOS_ID, chat.end_id] and hf.generation_config.pad_token_id == PAD_ID
    assert generate_text(ours, tokenizer, "hi", 8, chat=chat, temperature=0) == ""  # ours stops there too
    back, _, _ = load_folder(tmp_path / "hf")  # our own importer reads the folder as before
    assert same_weights(back, ours)
    # rigged to answer </s>, which transformers stops at as well: ours ran on past it into a new document
    with torch.no_grad():
        ours.output.weight.zero_()
        ours.output.weight[EOS_ID, 0] = 10.0
    save_hf(ours, tokenizer, tmp_path / "hf-eos")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-eos").eval()
    assert hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist() == [EOS_ID]
    asked, ends = encode_prompt(tokenizer, "hi", chat)  # what lfpl-generate chat=true and lfpl-serve generate from
    assert generate(ours, asked, 8, eos_id=ends, temperature=0) == []  # was </s> 8 times (they decode to nothing)
    # a tokenizer without the chat tokens: no generation_config.json, config.json's </s> stops generation as before
    plain = Tokenizer(sentencepiece_model(normalization_rule_name="identity", remove_extra_whitespaces=False))
    save_hf(tiny_model(plain), plain, tmp_path / "plain")
    assert not (tmp_path / "plain" / "generation_config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Import, and round trips
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_import_of_export_gives_identical_weights(tokenizer, tmp_path, tied):
    ours = tiny_model(tokenizer, tie_embeddings=tied)
    save_hf(ours, tokenizer, tmp_path / "hf")
    back, back_tokenizer = load_hf(tmp_path / "hf")
    assert same_weights(back, ours) and back_tokenizer.sha256 == tokenizer.sha256
    assert (back.output.weight is back.tok_embeddings.weight) == tied
    assert back.config == ours.config
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied  # a tied head is stored once
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert mode["model.safetensors"] == mode["config.json"]  # not owner-only, as safetensors would leave it


def test_import_of_a_sharded_folder_written_by_transformers(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=24, rope_theta=321.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    tokenizer.save(tmp_path / "hf" / "tokenizer.model")
    ours, _, source = load_folder(tmp_path / "hf")
    assert source.format == "hf" and ours.config.rope_theta == 321.0 and ours.config.n_kv_heads == 2
    x = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_safetensors_round_trip_keeps_config_weights_and_run(tokenizer, tmp_path):
    ours = tiny_model(tokenizer, tie_embeddings=False, multiple_of=16, hidden_dim=None, dropout=0.1)
    save_safetensors(ours, tokenizer, tmp_path / "st", run_config={"data": {"seq_len": 32}})
    back, back_tokenizer = load_safetensors(tmp_path / "st")
    assert back.config == ours.config and same_weights(back, ours) and back_tokenizer.sha256 == tokenizer.sha256
    _, _, source = load_folder(tmp_path / "st")
    assert source.format == "safetensors" and source.run_config == {"data": {"seq_len": 32}}
    for edited in ("x", {"data": "x"}):  # lfpl-eval read it: AttributeError: 'str' object has no attribute 'get'
        rewrite_json(tmp_path / "st" / "config.json", run_config=edited)
        with pytest.raises(ConfigError, match="has a \"run_config\" that is not a run's settings .*set it to null"):
            load_folder(tmp_path / "st")
    tied = tiny_model(tokenizer)
    save_safetensors(tied, tokenizer, tmp_path / "tied")
    back, _ = load_safetensors(tmp_path / "tied")
    assert same_weights(back, tied) and back.output.weight is back.tok_embeddings.weight


def rewrite_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def replace_tokenizer(folder: Path, model_proto: bytes) -> Path:
    (folder / "tokenizer.model").write_bytes(model_proto)
    return folder


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda d: d / "model.safetensors", "is not a folder"),
        (lambda d: (d / "config.json").unlink() or d, "has no config.json"),
        (lambda d: rewrite_json(d / "config.json", architectures=["MistralForCausalLM"], model_type="mistral") or d,
         "holds a MistralForCausalLM model; only LlamaForCausalLM"),
        (lambda d: rewrite_json(d / "config.json", rope_scaling={"rope_type": "llama3", "factor": 8.0}) or d,
         "uses rope scaling 'llama3'"),
        (lambda d: (d / "tokenizer.model").unlink() or d, re.escape("has no tokenizer.model (a tokenizer.json alone")),
        (lambda d: replace_tokenizer(d, sentencepiece_model(bos_id=-1)),
         "tokenizer.model has no BOS token: .* needs a tokenizer that has both$"),
        (lambda d: rewrite_json(d / "config.json", num_hidden_layers=3) or d,
         r"lacks tensors for its config.json: model.layers.2.input_layernorm.weight, .* and 6 more"),
        (lambda d: rewrite_json(d / "config.json", intermediate_size=96) or d,
         r"tensors of the wrong shape .*mlp.gate_proj.weight \[80, 48\] instead of \[96, 48\]"),
        # model.py's TypeError, and "'float' object cannot be interpreted as an integer"
        (lambda d: rewrite_json(d / "config.json", num_hidden_layers="2", rope_theta=None, rms_norm_eps=True) or d,
         r"sets num_hidden_layers='2', rms_norm_eps=True: a Llama config.json holds integer sizes"),
        (lambda d: rewrite_json(d / "config.json", num_hidden_layers=2.5) or d, "sets num_hidden_layers=2.5: "),
    ],
    ids=["not-a-folder", "no-config", "not-llama", "rope-scaling", "no-tokenizer", "no-bos", "missing-tensors",
         "wrong-shape", "text-size", "fractional-size"],
)
def test_load_hf_refuses_with_one_line(tokenizer, tmp_path, spoil, message):
    save_hf(tiny_model(tokenizer), tokenizer, tmp_path / "hf")
    with pytest.raises(ConfigError, match=message) as error:
        load_hf(spoil(tmp_path / "hf"))
    assert "\n" not in str(error.value)


def test_write_folder_into_the_current_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    # out=. was a traceback (a path without a name has no temporary sibling); writing it would replace the folder
    # the user is in. A relative name is a new folder inside it, as before.
    monkeypatch.chdir(tmp_path)
    for here in (".", str(tmp_path), ".."):
        with pytest.raises(ConfigError, match="is the folder you are in .*such as out=my-model"):
            write_folder(here, lambda d: (d / "a").write_text("x"))
    assert write_folder("sub", lambda d: (d / "a").write_text("x")) == Path("sub")
    assert (tmp_path / "sub" / "a").read_text() == "x"
    (tmp_path / "model.ckpt").write_text("a checkpoint")  # out=model.ckpt/hf said "File exists (model.ckpt)"
    with pytest.raises(ConfigError, match="out=model.ckpt/hf is inside model.ckpt, which is a file, not a folder"):
        write_folder("model.ckpt/hf", lambda d: (d / "a").write_text("x"))


def model_files(text: str, name: str = "a"):
    """A fill for write_folder: a model folder's config.json and one file holding ``text``."""
    def fill(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        (folder / name).write_text(text)
    return fill


def test_write_folder_refuses_a_non_empty_folder_and_never_leaves_half_a_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_folder(out, model_files("first"))
    with pytest.raises(ConfigError, match="exists and is not empty; .* overwrite=true"):
        write_folder(out, model_files("second"))

    def crash(folder: Path) -> None:
        (folder / "a").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder(out, crash, overwrite=True)
    assert (out / "a").read_text() == "first"  # the old folder is untouched
    real_rename = Path.rename

    def failing_rename(self: Path, target):  # the last step, renaming the new folder into place, fails
        if self.name.endswith(".tmp"):
            raise OSError(28, "No space left on device", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(ConfigError, match=r"cannot write out=.*: No space left on device"):
        write_folder(out, model_files("second", "b"), overwrite=True)
    assert (out / "a").read_text() == "first"  # the old folder was put back
    monkeypatch.undo()
    write_folder(out, model_files("second", "b"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and sorted(p.name for p in out.iterdir()) == [
        "b", "config.json"]
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        write_folder(out / "b", lambda d: None, overwrite=True)
    # overwrite=true replaces a model folder only: out=outputs deleted every run and checkpoint in it
    (tmp_path / "outputs/run/checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="is not a model folder .*overwrite=true replaces only those"):
        write_folder(tmp_path / "outputs", model_files("x"), overwrite=True)
    assert (tmp_path / "outputs/run/checkpoints").is_dir()


def test_write_folder_keeps_a_folder_another_export_wrote_meanwhile(tmp_path):
    # Checked empty at the start, out was moved aside and deleted at the end whether or not overwrite was given: of
    # two exports into one folder at once, the first to finish was lost
    out = tmp_path / "out"

    def slow_fill(folder: Path) -> None:
        (folder / "a").write_text("mine")
        write_folder(out, lambda d: (d / "a").write_text("theirs"))  # the other export, done first

    with pytest.raises(ConfigError, match="written by something else while this export ran; .*overwrite=true"):
        write_folder(out, slow_fill)
    assert (out / "a").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# The commands: lfpl-export, and lfpl-eval on what it wrote
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, cache_dir) -> Path:
    """A Lightning checkpoint as lfpl-train leaves it (model, tokenizer, the run's data settings), trained briefly
    in-process on one play, so that it has learnt something from context."""
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "play.txt").write_text(sorted(bundled_corpus_dir().glob("*.txt"))[0].read_text())
    data = DataConfig(path=str(corpus), vocab_size=400, seq_len=32, batch_size=8, cache_dir=str(cache_dir))
    datamodule = TextDataModule(data)
    datamodule.prepare_data()
    torch.manual_seed(0)
    model = ModelConfig(vocab_size=400, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    lit = LitLlama(model, run_config={"data": {"path": str(corpus), "seq_len": 32, "val_fraction": 0.05}})
    lit.set_tokenizer(datamodule.tokenizer)
    trainer = L.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(lit, datamodule=datamodule)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture
def verse(tmp_path) -> Path:
    """Text the checkpoint was not trained on."""
    text = tmp_path / "verse.txt"
    text.write_text(sorted(bundled_corpus_dir().glob("*.txt"))[4].read_text()[:5000])
    return text


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_export_cli_writes_a_folder_that_eval_scores_like_the_checkpoint(checkpoint, verse, tmp_path, compose_train):
    proc = run_cli("export", f"ckpt_path={checkpoint}", "out=hf", cwd=tmp_path)
    assert f"exported {checkpoint} (Lightning checkpoint)" in proc.stdout
    assert "as hf (Hugging Face Llama folder," in proc.stdout
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
        "tokenizer_config.json"]  # the trained tokenizer has the chat tokens: generation also stops at <|end|>
    proc = run_cli("eval", "ckpt_path=hf", f"data.path={verse}", cwd=tmp_path)
    assert "model: hf (Hugging Face Llama folder)" in proc.stdout
    on_hf = last_json(proc.stdout)
    on_ckpt = evaluate(compose_train([f"ckpt_path={checkpoint}", f"data.path={verse}"], name="eval"))
    assert on_hf["format"] == "hf" and on_hf["val/loss"] == pytest.approx(on_ckpt["val/loss"], abs=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "verse.txt"]  # nothing else written


def test_export_hf_to_our_format_and_strided_eval(checkpoint, verse, tmp_path, compose_train, capsys):
    export(compose_train([f"ckpt_path={checkpoint}", f"out={tmp_path / 'hf'}"], name="export"))
    export(compose_train([f"ckpt_path={tmp_path / 'hf'}", "format=safetensors", f"out={tmp_path / 'st'}"],
                         name="export"))  # Hugging Face → ours: the input may be any model folder
    assert json.loads((tmp_path / "st" / "config.json").read_text())["format"] == "llmfoundry_pl"
    plain = evaluate(compose_train([f"ckpt_path={tmp_path / 'st'}", f"data.path={verse}"], name="eval"))
    plain_record = last_json(capsys.readouterr().out)
    strided = evaluate(compose_train([f"ckpt_path={tmp_path / 'st'}", f"data.path={verse}", "data.stride=8"],
                                     name="eval"))
    record = last_json(capsys.readouterr().out)
    assert record["format"] == "safetensors" and (record["seq_len"], record["stride"]) == (32, 8)
    assert record["tokens"] == plain_record["tokens"]
    # every token scored once, now with 24 to 31 tokens of context instead of 0 to 31: this model does better
    assert strided["val/loss"] < plain["val/loss"]


def test_export_counts_a_lora_checkpoints_base_among_what_it_must_not_replace(tmp_path):
    # out= the base model's folder with overwrite=true replaced it, and the adapters' checkpoint became unusable
    from llmfoundry_pl.cli.export import _sources

    base, lora, full = tmp_path / "base" / "model.safetensors", tmp_path / "lora.ckpt", tmp_path / "full.ckpt"
    torch.save({"hyper_parameters": {"lora": {"enabled": True}, "init_from": str(base.parent)}}, lora)
    torch.save({"hyper_parameters": {"lora": {"enabled": False}, "init_from": str(base.parent)}}, full)
    assert _sources(str(lora)) == [lora, base.parent]
    assert _sources(str(full)) == [full]  # a full fine-tune holds every weight: its init_from is a record only


def test_export_config_is_checked_before_anything_runs(compose_train):
    with pytest.raises(ConfigCompositionException, match="formt"):
        compose_train(["ckpt_path=x.ckpt", "out=y", "formt=hf"], name="export")
    with pytest.raises(ConfigError, match="format='onnx' is not one of hf, safetensors"):
        to_dataclass(compose_train(["ckpt_path=x.ckpt", "out=y", "format=onnx"], name="export"), ExportConfig)


def test_export_cli_mistakes_fail_with_one_line(checkpoint, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("not yours")
    proc = run_cli("export", f"ckpt_path={checkpoint}", "out=taken", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: out=taken exists and is not empty; choose another folder, or pass overwrite=true to replace it")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    # overwrite=true deleted what it exported: a model folder exported onto itself, or the run holding the checkpoint
    run_cli("export", f"ckpt_path={checkpoint}", "out=m", "format=safetensors", cwd=tmp_path)
    proc = run_cli("export", "ckpt_path=m", "out=m", "overwrite=true", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "error: out=m holds the model being exported (m)" in proc.stderr
    proc = run_cli("export", f"ckpt_path={checkpoint}", f"out={checkpoint.parent}", "overwrite=true",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is not a model folder" in proc.stderr and checkpoint.is_file()
    assert (tmp_path / "m" / "config.json").is_file()
    proc = run_cli("export", "ckpt_path=no/such.ckpt", "out=new", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: ckpt_path=no/such.ckpt does not exist; give a .ckpt file (or last), a folder written by "
        "lfpl-export, or a Hugging Face Llama folder")
    assert not (tmp_path / "new").exists()
