import math

import pytest
import torch

from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.inference.generate import (
    TextStreamer,
    apply_repetition_penalty,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    generate,
    generate_text,
    sample_next,
    stream_text,
)
from llmfoundry_pl.inference.kv_cache import new_kv_cache
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=400, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)).eval()


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits)).flatten().tolist()


def test_cache_prefill_and_decode_give_the_full_forward_logits(model):
    tokens = torch.randint(0, 400, (2, 20))
    full = model(tokens)
    cache = new_kv_cache(model, batch_size=2)
    parts = [model(tokens[:, :7], cache, 0), model(tokens[:, 7:12], cache, 7)]  # prefill, then a 5-token chunk
    parts += [model(tokens[:, i : i + 1], cache, i) for i in range(12, 20)]  # then one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_new_tokens", [10, 40])  # 40 runs past max_seq_len=24: the window slides
def test_greedy_with_cache_equals_recomputation(model, max_new_tokens):
    prompt = [1, 17, 42, 99]
    cached = generate(model, prompt, max_new_tokens, temperature=0)
    recomputed = generate(model, prompt, max_new_tokens, temperature=0, use_cache=False)
    assert cached == recomputed and len(cached) == max_new_tokens


def test_sampling_is_reproducible_with_a_seed(model):
    runs = [generate(model, [1, 5], 15, temperature=1.0, top_k=50, seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    assert kept(filter_top_p(logits, 0.8)) == [1, 3]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_top_p(logits, 0.81)) == [1, 2, 3]
    assert kept(filter_top_p(logits, 0.4)) == [1]
    assert kept(filter_top_p(logits, 1.0)) == [0, 1, 2, 3]


def test_top_k_and_min_p():
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    assert kept(filter_top_k(logits, 2)) == [1, 3]
    assert kept(filter_min_p(logits, 0.4)) == [1, 3]  # threshold 0.4 · 0.5 = 0.2
    assert kept(filter_min_p(logits, 0.2)) == [1, 2, 3]  # threshold 0.1
    assert kept(filter_min_p(logits, 0.05)) == [0, 1, 2, 3]  # threshold 0.025


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), previous=[0, 1, 1], penalty=2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_greedy_and_filters_in_sample_next():
    g = torch.Generator().manual_seed(0)
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    assert sample_next(logits, g, temperature=0) == 1
    assert sample_next(logits, g, temperature=0, repetition_penalty=100.0, previous=[1]) == 3
    draws = {sample_next(logits, g, temperature=1.0, top_p=0.8) for _ in range(200)}
    assert draws == {1, 3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(top_p=1.5), "top_p=1.5 must be in"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_k=0), "top_k=0"),
     (dict(min_p=1.0), "min_p=1.0"), (dict(temperature=-1.0), "temperature=-1.0"),
     (dict(repetition_penalty=0.0), "repetition_penalty=0.0")],
)
def test_bad_sampling_settings_are_one_line_errors(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(model, [1], 3, **kwargs)


def test_prompt_longer_than_the_context_is_an_error(model):
    with pytest.raises(ConfigError, match="the prompt is 25 tokens; it must be 1 to 24"):
        generate(model, [1] * 25, 3)


def test_stop_strings_cut_the_text(model):
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:1] for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(lines, vocab_size=400)
    full = generate_text(model, tokenizer, "A", 20, temperature=0)
    stop = full[4:6]
    assert generate_text(model, tokenizer, "A", 20, temperature=0, stop=[stop]) == full[: full.find(stop)]


def test_streamer_never_splits_a_character_and_reassembles_exactly():
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:1] for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(lines + ["学而时习之，不亦说乎？"] * 10, vocab_size=400)
    text = "ROMEO: 你好，世界！🙂 naïve café — 不亦乐乎？\n\nJULIET. 未见之字：龘"
    streamer = TextStreamer(tokenizer)
    deltas = [streamer.push(i) for i in tokenizer.encode(text)] + [streamer.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 10  # it really streams


def test_stream_text_yields_what_generate_text_returns(model):
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:1] for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(lines, vocab_size=400)
    assert "".join(stream_text(model, tokenizer, "A", 15, temperature=0)) == generate_text(
        model, tokenizer, "A", 15, temperature=0)
    model.train()
    stream = stream_text(model, tokenizer, "A", 15, temperature=0)
    next(stream)
    stream.close()  # a reader that stops early: the model goes back to train mode all the same
    assert model.training
    model.eval()
