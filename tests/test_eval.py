"""lfpl-eval's sliding window (data.stride): every held-out token scored once, with the context the stride promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from llmfoundry_pl.cli.eval import _warn_if_the_split_changed, _warn_if_tokens_drop_text, evaluation_data
from llmfoundry_pl.config import ConfigError, DataConfig, ModelConfig
from llmfoundry_pl.data import TextDataModule
from llmfoundry_pl.data.corpus import split_counts
from llmfoundry_pl.data.datamodule import IGNORE_INDEX, SweepWindows, _TokenFile
from llmfoundry_pl.interop import ModelSource
from llmfoundry_pl.lit_module import LitLlama
from llmfoundry_pl.model import Transformer


def token_file(tmp_path, n: int, vocab: int = 50) -> _TokenFile:
    path = tmp_path / f"val-{n}.bin"
    np.random.default_rng(n).integers(0, vocab, n).astype(np.uint16).tofile(path)
    return _TokenFile(path, np.dtype(np.uint16))


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(23, 8, 3), (23, 8, 8), (9, 8, 1), (8, 8, 5), (100, 16, 7)])
def test_strided_windows_score_every_target_once_with_enough_context(tmp_path, n, seq_len, stride):
    windows = SweepWindows(token_file(tmp_path, n), seq_len, pad_id=-1, stride=stride)  # -1: Llama's "no pad"
    scored = []
    for i in range(len(windows)):
        x, y = windows[i]
        assert x.min() >= 0  # padding uses a real id
        positions = torch.nonzero(y != IGNORE_INDEX).flatten().tolist()
        assert positions  # no window without a new target
        for position in positions:
            target = i * stride + position + 1  # index in the token file of the token predicted here
            assert y[position] == windows.tokens.tokens[target]
            if i > 0:
                assert position >= seq_len - stride  # at least seq_len - stride tokens of context
            scored.append(target)
    assert scored == list(range(1, n))  # each target once, in order


def reference_nll(model: Transformer, tokens: list[int], seq_len: int, stride: int) -> tuple[float, int]:
    """Hugging Face's "perplexity of fixed-length models" loop, written out token by token: windows of seq_len
    inputs start every stride tokens; each scores only the targets past the previous window's end."""
    total, count, scored_until = 0.0, 0, 0  # targets 1..scored_until are done
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + seq_len, len(tokens) - 1)  # inputs tokens[begin:end] predict tokens[begin+1:end+1]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([tokens[begin:end]]))[0].double(), dim=-1)
        for target in range(scored_until + 1, end + 1):
            total -= log_probs[target - 1 - begin, tokens[target]].item()
            count += 1
        scored_until = end
        if end == len(tokens) - 1:
            break
    return total, count


def test_strided_loss_equals_a_hand_computed_sliding_window(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=8,
                                    init_std=0.3)).eval()
    tokens_file = token_file(tmp_path, 23)
    tokens = tokens_file.tokens.astype(np.int64).tolist()
    lit = LitLlama(model.config, network=model)  # no tokenizer: val/bpb is bits per token
    results = {}
    for stride in (8, 3):
        lit.val_metrics.reset()
        windows = SweepWindows(tokens_file, seq_len=8, pad_id=0, stride=stride)
        for batch_idx, batch in enumerate(DataLoader(windows, batch_size=2)):
            lit.validation_step(batch, batch_idx)
        nats, count = reference_nll(model, tokens, seq_len=8, stride=stride)
        assert lit.val_metrics.tokens.item() == count == 22  # every target, exactly once
        assert lit.val_metrics.nats.item() == pytest.approx(nats, rel=1e-5)
        results[stride] = lit.val_metrics.compute()["loss"].item()
    # a different number: the overlapping windows really give other (more) context
    assert results[3] != pytest.approx(results[8], rel=1e-4)
    # and stride 8 is the plain cross-entropy of three back-to-back windows (7 + 8 + 7 targets)
    x = torch.tensor([tokens[0:8], tokens[8:16], tokens[16:22] + [0, 0]])
    y = torch.tensor([tokens[1:9], tokens[9:17], tokens[17:23] + [IGNORE_INDEX] * 2])
    with torch.no_grad():
        plain = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    assert results[8] == pytest.approx(plain.item(), rel=1e-5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.stride=0"], "data.stride=0 must be between 1 and the window length 32"),
    (["data.stride=33"], "data.stride=33 must be between 1 and the window length 32"),
    (["data.seq_len=64"], "data.seq_len=64 exceeds the model's context max_seq_len=32"),
    (["data.seq_len=0"], "data.seq_len=0 must be positive"),  # not taken for null (the model's own length)
    ([], "does not say what it was trained on, so there is no validation split to take; give the text"),
])
def test_eval_data_mistakes_are_one_line(compose_train, overrides, message):
    cfg = compose_train(["ckpt_path=some/folder", *overrides], name="eval")
    model_cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, max_seq_len=32)
    tokenizer = type("Tok", (), {"vocab_size": 50})()
    source = ModelSource("some/folder", "hf", run_config=None if not overrides else {"data": {"seq_len": 32}})
    with pytest.raises(ConfigError, match=message):
        evaluation_data(cfg, source, model_cfg, tokenizer)


def test_eval_takes_the_runs_own_split_or_all_of_the_text_given(compose_train, tmp_path):
    # The run's val_fraction picks its held-out split: with the default instead, a run trained with
    # data.val_fraction=0.2 was scored on a split holding text it trained on
    cfg = compose_train(["ckpt_path=some.ckpt"], name="eval")
    model_cfg = ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, max_seq_len=32)
    tokenizer = type("Tok", (), {"vocab_size": 50})()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    run = {"data": {"path": str(corpus), "val_fraction": 0.2, "text_field": "body", "seq_len": 16, "val_stride": 4}}
    data = evaluation_data(cfg, ModelSource("some.ckpt", "ckpt", run_config=run), model_cfg, tokenizer)
    # ... in the run's own windows too: its val_stride was left out, so the figures were not the run's val/ ones
    assert (data.path, data.val_fraction, data.text_field, data.seq_len, data.val_stride) == \
        (str(corpus), 0.2, "body", 16, 4)
    for other_windows in (["data.stride=8"], ["data.seq_len=8"]):  # windows asked for are the ones given
        asked = compose_train(["ckpt_path=some.ckpt", *other_windows], name="eval")
        data = evaluation_data(asked, ModelSource("some.ckpt", "ckpt", run_config=run), model_cfg, tokenizer)
        assert data.val_stride == (8 if other_windows == ["data.stride=8"] else None)
    given = compose_train(["ckpt_path=some.ckpt", f"data.path={tmp_path}"], name="eval")
    data = evaluation_data(given, ModelSource("some.ckpt", "ckpt", run_config=run), model_cfg, tokenizer)
    assert (data.path, data.val_fraction, data.val_stride) == (str(tmp_path), 1.0, None)
    # the run's text moved away: said as such, not as a data.path the user had not given
    corpus.rmdir()
    with pytest.raises(ConfigError, match=f"ckpt_path=some.ckpt was trained on {corpus}, which is not there now"):
        evaluation_data(cfg, ModelSource("some.ckpt", "ckpt", run_config=run), model_cfg, tokenizer)


def test_eval_warns_when_the_runs_text_changed_since(tmp_path, capsys):
    """The run's own split is rebuilt from its text: edited since, it was silently another split."""
    text = tmp_path / "book.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    cfg = DataConfig(path=str(text), vocab_size=320, seq_len=16, cache_dir=str(tmp_path / "cache"))
    trained = TextDataModule(cfg)
    trained.prepare_data()
    source = ModelSource("run.ckpt", "ckpt", run_config={"data_split": split_counts(trained.token_files.meta)})
    _warn_if_the_split_changed(source, TextDataModule(cfg, tokenizer=trained.tokenizer))
    assert capsys.readouterr().err == ""
    text.write_text(text.read_text() + "Whether 'tis nobler in the mind to suffer.\n")
    _warn_if_the_split_changed(source, TextDataModule(cfg, tokenizer=trained.tokenizer))
    err = capsys.readouterr().err
    assert err.startswith("warning: the text ckpt_path=run.ckpt was trained on has changed since "
                          "(bytes 8,600 → 8,643, train_tokens ")
    assert "its figures are not comparable with the run's val/ metrics" in err
    _warn_if_the_split_changed(ModelSource("old.ckpt", "ckpt", run_config={}),  # a run from before runs recorded it
                               TextDataModule(cfg, tokenizer=trained.tokenizer))
    assert capsys.readouterr().err == ""


def test_eval_warns_when_the_tokenizer_drops_bytes_of_the_text(tmp_path, capsys, monkeypatch):
    # An imported tokenizer that normalizes (NFKC) and squeezes whitespace counted a full-width line as a third of
    # its bytes, and bits per byte read high with no word; this project's tokenizers keep every byte.
    import io

    import sentencepiece as spm

    from llmfoundry_pl import tokenizer as tokenizer_module
    from llmfoundry_pl.tokenizer import Tokenizer

    text = tmp_path / "book.txt"
    text.write_text("ＲＯＭＥＯ:  what   light through yonder window breaks?\n" * 100)
    cfg = DataConfig(path=str(text), vocab_size=320, seq_len=16, val_fraction=1.0, cache_dir=str(tmp_path / "cache"))
    ours = TextDataModule(cfg)
    ours.prepare_data()
    assert ours.tokenizer.text_bytes(np.fromfile(ours.token_files.val_path, ours.token_files.dtype)) == \
        len(text.read_bytes())
    _warn_if_tokens_drop_text(TextDataModule(cfg, tokenizer=ours.tokenizer), ours.tokenizer)
    assert capsys.readouterr().err == ""
    buffer = io.BytesIO()  # SentencePiece's defaults: nmt_nfkc, remove_extra_whitespaces
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.read_text().splitlines()), model_writer=buffer,
                                   model_type="bpe", vocab_size=60, minloglevel=2)
    normalizing = Tokenizer(buffer.getvalue())
    theirs = TextDataModule(cfg, tokenizer=normalizing)
    _warn_if_tokens_drop_text(theirs, normalizing)
    err = capsys.readouterr().err
    assert err.startswith("warning: the tokenizer keeps ") and f"of the text's {len(text.read_bytes()):,} bytes" in err
    # Counted in slices of a token file of any size, a <s> ending one: its next token is still a document's first
    # (which counts a byte less with this tokenizer's dummy prefix)
    one = np.fromfile(theirs.token_files.val_path, theirs.token_files.dtype)
    assert normalizing.adds_dummy_prefix
    monkeypatch.setattr(tokenizer_module, "_TEXT_BYTES_SLICE", len(one) + 1)  # slice 1: the document and the next <s>
    assert normalizing.text_bytes(np.concatenate([one, one])) == 2 * normalizing.text_bytes(one)

