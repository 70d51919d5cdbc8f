import dataclasses
import math

import pytest
import torch

from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.inference import (
    SpeculativeStats,
    TextStreamer,
    generate,
    generate_batch,
    generate_text,
    generate_text_batch,
    speculative_stream,
    stream_text,
)
from llmfoundry_pl.inference.kv_cache import new_kv_cache
from llmfoundry_pl.inference.sampling import (
    apply_repetition_penalty,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    next_token_probs,
    sample_next,
)
from llmfoundry_pl.inference.speculative import accept_draft
from llmfoundry_pl.inference.text import StopStringStreamer
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
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([True, True, False]), penalty=2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_next_token_probs_apply_each_setting():
    # Each setting was checked for validity, and each filter alone: nothing checked that sampling applied them
    # (temperature dropped, or min_p skipped, left generate, the server and the training samples unchanged)
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    plain = torch.softmax(logits, -1)
    torch.testing.assert_close(next_token_probs(logits), plain)
    for temperature in (0.5, 2.0):
        torch.testing.assert_close(next_token_probs(logits, temperature=temperature),
                                   torch.softmax(logits / temperature, -1))
    assert next_token_probs(logits, temperature=0.5)[1] > plain[1] > next_token_probs(logits, temperature=2.0)[1]
    assert kept(next_token_probs(logits, min_p=0.4).log()) == [1, 3]
    assert kept(next_token_probs(logits, top_k=2).log()) == [1, 3]
    assert kept(next_token_probs(logits, top_p=0.6).log()) == [1, 3]
    assert kept(next_token_probs(logits, top_p=1e-300).log()) == [1]  # 0 in fp32: every token was dropped


def test_greedy_and_filters_in_sample_next():
    g = torch.Generator().manual_seed(0)
    logits = logits_of([0.05, 0.5, 0.15, 0.3])
    assert sample_next(logits, g, temperature=0) == 1
    for tiny in (1e-6, 1e-45, 1e-300):  # logits / 1e-45 overflow fp32: the draw failed on inf and NaN
        assert sample_next(logits, g, temperature=tiny) == 1
        assert next_token_probs(logits, temperature=tiny).tolist() == [0.0, 1.0, 0.0, 0.0]
    seen = torch.tensor([False, True, False, False])
    assert sample_next(logits, g, temperature=0, repetition_penalty=100.0, seen=seen) == 3
    draws = {int(sample_next(logits, g, temperature=1.0, top_p=0.8)) for _ in range(200)}
    assert draws == {1, 3}
    with pytest.raises(ConfigError, match="next-token scores are NaN or infinite"):  # a diverged model's
        sample_next(torch.full((2, 4), float("nan")), g, temperature=1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(top_p=1.5), "top_p=1.5 must be in"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_k=0), "top_k=0"),
     (dict(min_p=1.0), "min_p=1.0"), (dict(temperature=-1.0), "temperature=-1.0"),
     (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
     # NaN passed both checks: greedy decoding picked the lowest-numbered token seen at every step
     (dict(temperature=float("nan")), "temperature=nan"), (dict(repetition_penalty=float("nan")), "penalty=nan")],
)
def test_bad_sampling_settings_are_one_line_errors(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(model, [1], 3, **kwargs)


def test_a_model_with_nan_weights_is_an_error_not_garbage(model):
    diverged = Transformer(model.config).eval()
    diverged.load_state_dict({k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()})
    for temperature in (0.0, 0.8):  # greedy picked token 0 every time; sampling failed in torch.multinomial
        with pytest.raises(ConfigError, match="weights hold NaN or inf"):
            generate(diverged, [1, 2, 3], 4, temperature=temperature)
        for target, draft in ((diverged, model), (model, diverged)):  # greedy speculative decoding printed token 0s
            with pytest.raises(ConfigError, match="weights hold NaN or inf"):
                list(speculative_stream(target, draft, [1, 2, 3], 4, temperature=temperature))


def test_a_float16_overflow_is_not_blamed_on_the_weights(model):
    # precision=16-true: activations past 65504 were reported as NaN weights, and an older checkpoint advised
    overflowing = Transformer(model.config).eval()
    overflowing.load_state_dict(model.state_dict())
    with torch.no_grad():
        overflowing.norm.weight.mul_(1e5)  # logits of ~1e5: finite in fp32
    assert len(generate(overflowing, [1, 2, 3], 2, temperature=0)) == 2
    with pytest.raises(ConfigError, match="in float16 its activations outgrew the format's range, or its weights "
                                          "hold NaN or inf; use precision=bf16-true or 32-true"):
        generate(overflowing.half(), [1, 2, 3], 2, temperature=0)


def test_prompt_longer_than_the_context_is_an_error(model):
    with pytest.raises(ConfigError, match="the prompt is 25 tokens; it must be 1 to 24"):
        generate(model, [1] * 25, 3)


def test_stop_strings_cut_the_text(model):
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:1] for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(lines, vocab_size=400)
    full = generate_text(model, tokenizer, "A", 20, temperature=0)
    stop = full[4:6]
    assert generate_text(model, tokenizer, "A", 20, temperature=0, stop=[stop]) == full[: full.find(stop)]
    with pytest.raises(ConfigError, match="holds an empty string"):  # "" is found at once: nothing would come
        generate_text(model, tokenizer, "A", 20, stop=["B", ""])
    with pytest.raises(ConfigError, match="holds an empty string"):
        generate_text_batch(model, tokenizer, ["A"], 20, stop=[""])


def test_stop_strings_cut_at_the_first_and_never_leak_a_partial_one():
    # Two stop strings in the text: the cut belongs before the first (not the last found). A stop string spanning
    # tokens: its start is held back until the next tokens tell, never streamed and then found to be one.
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:1] for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(lines, vocab_size=400)
    text = "What light through yonder window breaks?\nJULIET: Ay me!\nROMEO: She speaks."
    ids = tokenizer.encode(text)
    for stop, cut in ((["ROMEO:", "\nJULIET:"], text.index("\nJULIET:")), (["speaks"], text.index("speaks"))):
        streamer = StopStringStreamer(tokenizer, tokenizer.bos_id, stop)
        deltas = []
        for i in ids:
            deltas.append(streamer.push(i))
            assert text[:cut].startswith("".join(deltas)), (stop, deltas)  # nothing past the cut, ever
            if streamer.stopped:
                break
        assert "".join(deltas) + streamer.finish() == text[:cut]
    assert len(tokenizer.encode("\nJULIET:")) > 1  # the stop string spans tokens

    # A stop string that only the flushed end completes (a character cut short decodes to U+FFFD) stops too, so the
    # server answers finish_reason "stop", not "length".
    cut_short = tokenizer.encode("A 表")[:-1]  # the last of its three byte tokens missing
    streamer = StopStringStreamer(tokenizer, tokenizer.bos_id, ["\ufffd"])
    assert "".join(streamer.push(i) for i in cut_short) == "A " and not streamer.stopped
    assert streamer.finish() == "" and streamer.stopped

    # A long stop string costs work per token for the text held back only, not for each of its lengths: a server
    # request with a 300,000-character one took 2.4 s per token, on the thread that serves every request.
    class CountedPrefixes(str):
        cuts = 0

        def __getitem__(self, key):
            CountedPrefixes.cuts += 1
            return str.__getitem__(self, key)

    long_stop = CountedPrefixes("x" * 10_000)
    streamer = StopStringStreamer(tokenizer, tokenizer.bos_id, [long_stop])
    assert "".join(streamer.push(i) for i in ids) + streamer.finish() == text  # no x in it: all of it comes out
    assert CountedPrefixes.cuts <= 2 * len(text)  # was ~10,000 per token


def test_a_batch_ends_each_prompt_at_its_end_token_or_first_stop_string(model, monkeypatch):
    # generate_text_batch gave generate_batch no end token: lfpl-generate prompt_file= ran on past </s> (a chat
    # reply past <|end|>, into invented turns) to max_new_tokens
    from llmfoundry_pl.chat import ChatFormat
    from llmfoundry_pl.inference import text as text_module

    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:1] for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(lines, vocab_size=400)
    asked, text = [], "What light?\nJULIET: Ay me!\nROMEO: She speaks."
    monkeypatch.setattr(text_module, "generate_batch", lambda m, prompts, n, eos_id, **kw: asked.append(eos_id)
                        or [tokenizer.encode(text) for _ in prompts])
    # each text cut before the first of the stop strings it holds (two here)
    assert generate_text_batch(model, tokenizer, ["A", "B"], 4, stop=["ROMEO:", "\nJULIET:"]) == ["What light?"] * 2
    generate_text_batch(model, tokenizer, ["A"], 4, chat=ChatFormat(tokenizer))
    assert asked == [(tokenizer.eos_id,), ChatFormat(tokenizer).stop_ids]  # a reply ends at <|end|> or </s>


def test_streamer_never_splits_a_character_and_reassembles_exactly():
    lines = [line for f in sorted(bundled_corpus_dir().glob("*.txt"))[:1] for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(lines + ["学而时习之，不亦说乎？"] * 10, vocab_size=400)
    text = "ROMEO: 你好，世界！🙂 naïve café — 不亦乐乎？\n\nJULIET. 未见之字：龘"
    streamer = TextStreamer(tokenizer, tokenizer.bos_id)
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


def test_filters_work_row_by_row_on_a_batch():
    logits = torch.stack([logits_of([0.05, 0.5, 0.15, 0.3]), logits_of([0.6, 0.1, 0.2, 0.1])])
    out = filter_top_p(logits, 0.8)
    assert kept(out[0]) == [1, 3] and kept(out[1]) == [0, 2]
    assert [kept(row) for row in filter_top_k(logits, 1)] == [[1], [0]]
    assert [kept(row) for row in filter_min_p(logits, 0.4)] == [[1, 3], [0]]


@pytest.mark.parametrize("max_new_tokens", [6, 30])  # 30 runs past max_seq_len=24: each row's window slides
def test_batch_of_ragged_prompts_equals_generating_each_alone(model, max_new_tokens):
    prompts = [[1, 17, 42, 99, 7, 8, 9], [1, 5], [1, 300, 2, 11], [1] + list(range(20, 40))]
    alone = [generate(model, p, max_new_tokens, temperature=0) for p in prompts]
    assert generate_batch(model, prompts, max_new_tokens, temperature=0) == alone
    assert generate_batch(model, prompts, max_new_tokens, temperature=0, use_cache=False) == alone


def test_batch_rows_end_at_their_own_eos(model):
    prompts = [[1, 17, 42], [1, 5, 6, 7, 8]]
    full = [generate(model, p, 12, temperature=0) for p in prompts]
    eos = full[0][3]  # the 4th token of row 0 plays end-of-text
    out = generate_batch(model, prompts, 12, temperature=0, eos_id=eos)
    for row, tokens in zip(out, full, strict=True):
        assert row == (tokens[: tokens.index(eos)] if eos in tokens else tokens)


def test_batched_penalty_counts_each_row_own_tokens(model):
    prompts = [[1, 17, 42], [1, 5, 6, 7, 8]]
    alone = [generate(model, p, 10, temperature=0, repetition_penalty=1.5) for p in prompts]
    assert generate_batch(model, prompts, 10, temperature=0, repetition_penalty=1.5) == alone


@pytest.fixture(scope="module")
def draft(model) -> Transformer:
    """The target with noise on its weights: agrees with it often but not always, like a real draft model."""
    torch.manual_seed(1)
    noisy = Transformer(model.config).eval()
    with torch.no_grad():
        for mine, theirs in zip(noisy.parameters(), model.parameters(), strict=True):
            mine.copy_(theirs + 0.5 * theirs.std() * torch.randn_like(theirs))
    return noisy


@pytest.mark.parametrize("draft_tokens", [1, 3, 5])
@pytest.mark.parametrize("max_new_tokens", [7, 30])  # 30 runs past the context: plain decoding finishes
def test_greedy_speculative_decoding_equals_the_target_alone(model, draft, draft_tokens, max_new_tokens):
    prompt = [1, 17, 42, 99]
    stats = SpeculativeStats()
    out = list(speculative_stream(model, draft, prompt, max_new_tokens, draft_tokens=draft_tokens, temperature=0,
                                  stats=stats))
    assert out == generate(model, prompt, max_new_tokens, temperature=0)
    assert 0 < stats.accepted < stats.proposed  # guesses both kept and rejected: every branch of the rule ran


def test_speculative_decoding_past_the_context_penalizes_the_whole_text_as_alone():
    # Past the target's 24 tokens, the plain decoding that finishes the text penalized the window's tokens only,
    # while generation without a draft penalizes every token of the text. A small vocabulary and large weights, so
    # that a token gone from the window (here <s>, at new token 33) comes out on top.
    torch.manual_seed(0)
    target = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24,
                                     init_std=0.5)).eval()
    draft = Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16,
                                    init_std=0.5)).eval()
    prompt = [1, 7, 3, 2, 8, 11, 4]
    out = list(speculative_stream(target, draft, prompt, 40, temperature=0, repetition_penalty=1.3))
    assert out == generate(target, prompt, 40, temperature=0, repetition_penalty=1.3)


def test_speculative_decoding_with_the_target_as_draft_accepts_everything(model):
    stats = SpeculativeStats()
    out = list(speculative_stream(model, model, [1, 17], 15, draft_tokens=4, temperature=0, stats=stats))
    assert out == generate(model, [1, 17], 15, temperature=0)
    assert stats.acceptance_rate == 1.0 and stats.target_calls == 3  # 5 tokens per call: 4 guesses + 1 bonus


@pytest.mark.parametrize("prompt_len", [4, 14])  # 14: longer than the draft's context, within the target's
def test_a_draft_with_a_shorter_context_still_gives_the_target_alone(model, draft, prompt_len):
    # The context is the target's: past the draft's 10 tokens the target decodes alone, and only past its own 24
    # does a window slide. Before, the draft's context capped both (the 14-token prompt was refused, and the
    # target slid a 10-token window: other tokens than its own greedy ones). Both models end in the mode they began.
    short = Transformer(dataclasses.replace(draft.config, max_seq_len=10))
    short.load_state_dict(draft.state_dict())
    model.train(), short.train()
    try:
        prompt = [1, *range(17, 17 + prompt_len - 1)]
        out = list(speculative_stream(model, short, prompt, 20, draft_tokens=3, temperature=0))
        assert model.training and short.training
        assert out == generate(model, prompt, 20, temperature=0)
    finally:
        model.eval()


def test_speculative_accept_rule_keeps_the_target_distribution():
    # Hand-made target p and draft q over 4 tokens, 2 guesses per round. Whatever the draft proposes, the first
    # emitted token must follow p[0], and the second (after the first guess is kept) p[1].
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.7, 0.1]])
    n = 20000
    first = torch.zeros(4)
    second_given_first_kept = torch.zeros(4)
    for _ in range(n):
        guesses = [int(torch.multinomial(q[0], 1, generator=g)), int(torch.multinomial(q[1], 1, generator=g))]
        emitted = accept_draft(p, q, guesses, g)
        first[emitted[0]] += 1
        if emitted[0] == guesses[0] and len(emitted) > 1:
            second_given_first_kept[emitted[1]] += 1
    # chi-square goodness of fit, 3 degrees of freedom: 16.27 is the 0.1% critical value
    for counts, expected in ((first, p[0]), (second_given_first_kept, p[1])):
        e = expected * counts.sum()
        assert float(((counts - e) ** 2 / e).sum()) < 16.27, (counts / counts.sum(), expected)
    # and a wrong rule would fail: the draft's own distribution is far from p[0]
    e = q[0] * first.sum()
    assert float(((first - e) ** 2 / e).sum()) > 100


def test_speculative_sampling_is_reproducible_and_bad_drafts_are_errors(model, draft):
    runs = [list(speculative_stream(model, draft, [1, 5], 12, temperature=1.0, seed=s)) for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2] and len(runs[0]) == 12
    other_vocab = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, max_seq_len=24))
    with pytest.raises(ConfigError, match="same tokenizer"):
        next(speculative_stream(model, other_vocab, [1, 5], 3))
    with pytest.raises(ConfigError, match="draft_tokens=0"):
        next(speculative_stream(model, draft, [1, 5], 3, draft_tokens=0))


def test_compiled_model_generates_what_the_eager_one_does(model):
    # lfpl-generate compile=true: torch.compile with dynamic shapes, so the growing cache does not recompile
    compiled = torch.compile(model, dynamic=True)
    prompts = [[1, 17, 42, 99], [1, 5]]
    assert generate_batch(compiled, prompts, 8, temperature=0) == generate_batch(model, prompts, 8, temperature=0)


def test_prompts_read_from_files_and_stdin_are_the_text_typed(tmp_path, monkeypatch):
    # A byte-order mark began the first prompt of a file saved by a Windows editor, and a Windows line end left its
    # \r in each prompt typed: both changed what the model was asked.
    import io

    from llmfoundry_pl.cli import generate as cli

    (tmp_path / "p.txt").write_bytes("\ufeffROMEO:\r\n\r\nJULIET: 你好\r\n".encode())
    assert cli.read_prompt_file(str(tmp_path / "p.txt")) == ["ROMEO:", "JULIET: 你好"]
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        cli.read_prompt_file(str(tmp_path / "latin1.txt"))
    monkeypatch.setattr(cli.sys, "stdin", io.StringIO("ROMEO:\r\nJULIET:\n"))
    assert list(cli.read_stdin_prompts()) == ["ROMEO:", "JULIET:"]


@pytest.fixture
def tiny_generate_cli(monkeypatch):
    """lfpl-generate's module, its models replaced by a tiny one over a tokenizer with the chat tokens."""
    from llmfoundry_pl.cli import generate as cli

    lines = [line for line in (bundled_corpus_dir() / "tempest_gut.txt").read_text().splitlines() if line]
    tokenizer = train_tokenizer(lines, vocab_size=400)
    torch.manual_seed(0)
    tiny = Transformer(ModelConfig(vocab_size=400, dim=32, n_layers=1, n_heads=2, max_seq_len=64)).eval()
    monkeypatch.setattr(cli, "load_models", lambda cfg: (tiny, tokenizer, None))
    return cli


def test_generate_chat_keeps_the_conversation_and_the_system_message(compose_train, tiny_generate_cli, monkeypatch,
                                                                      capsys):
    # lfpl-generate chat=true: a message too long for the context alone used to clear the whole conversation
    # before it, and prompt_file left the system message out of every prompt. The spies record what is asked.
    cli = tiny_generate_cli
    asked, stream_text = [], cli.stream_text

    def stream_spy(model, tok, prompt, *args, **kwargs):
        asked.append([m["content"] for m in prompt])
        return stream_text(model, tok, prompt, *args, **kwargs)

    monkeypatch.setattr(cli, "stream_text", stream_spy)
    # a line a GBK terminal typed (Python's stand-ins for bytes that are not UTF-8) ended the session in a traceback
    monkeypatch.setattr(cli, "read_stdin_prompts", lambda: iter(["hi", "x " * 200, "\udcc4\udce3", "yo"]))
    common = ["chat=true", "system=Be brief.", "max_new_tokens=2", "temperature=0"]
    replies = cli.generate(compose_train(["ckpt_path=x", "interactive=true", *common], name="generate"))
    assert asked[0] == ["Be brief.", "hi"] and asked[2] == ["Be brief.", "hi", replies[0], "yo"]
    assert "error: the prompt: character 1 is byte 0xc4, which is not UTF-8 text; remove it" in capsys.readouterr().err

    batches = []
    monkeypatch.setattr(cli, "generate_text_batch", lambda model, tok, prompts, *a, **k: batches.append(prompts)
                        or ["" for _ in prompts])
    monkeypatch.setattr(cli, "read_prompt_file", lambda path: ["ROMEO:", "JULIET:"])
    cli.generate(compose_train(["ckpt_path=x", "prompt_file=p.txt", *common], name="generate"))
    system = {"role": "system", "content": "Be brief."}
    assert batches == [[[system, {"role": "user", "content": p}] for p in ("ROMEO:", "JULIET:")]]
    # A prompt too long for the context: the batch said "the prompt is 403 tokens", not which of the file's
    monkeypatch.setattr(cli, "read_prompt_file", lambda path: ["ROMEO:", "JULIET " * 100, "HAMLET:"])
    with pytest.raises(ConfigError, match=r"prompt 2 of prompt_file=p.txt \('JULIET JULIET .*\.\.\.'\) is \d+ tokens, "
                                          "more than the model's context of 64"):
        cli.generate(compose_train(["ckpt_path=x", "prompt_file=p.txt", *common], name="generate"))


def test_ctrl_c_during_an_interactive_reply_stops_it_and_the_session_goes_on(compose_train, tiny_generate_cli,
                                                                             monkeypatch, capsys):
    # It ended the whole session (and a chat's history with it); at the prompt, Ctrl-C still ends it (test_cli.py).
    cli = tiny_generate_cli
    asked, stream_text = [], cli.stream_text

    def interrupted(model, tok, prompt, *args, **kwargs):  # Ctrl-C after the first delta of replies 1 and 3
        asked.append([m["content"] for m in prompt])
        deltas = stream_text(model, tok, prompt, *args, **kwargs)
        yield next(deltas)
        if len(asked) in (1, 3):
            raise KeyboardInterrupt
        yield from deltas

    monkeypatch.setattr(cli, "stream_text", interrupted)
    monkeypatch.setattr(cli, "read_stdin_prompts", lambda: iter(["hi", "yo"]))
    common = ["ckpt_path=x", "chat=true", "max_new_tokens=4", "temperature=0", "stream=true"]
    replies = cli.generate(compose_train([*common, "interactive=true"], name="generate"))
    assert len(replies) == 1 and asked == [["hi"], ["yo"]]  # the stopped reply is left out of the conversation
    out, err = capsys.readouterr()
    assert out.endswith(f"\n{replies[0]}\n") and "stopped (left out of the conversation)" in err
    with pytest.raises(KeyboardInterrupt):  # one prompt on the command line: Ctrl-C ends the run, as before
        cli.generate(compose_train([*common, "prompt=hi"], name="generate"))


def test_out_of_memory_during_an_interactive_reply_drops_it_and_the_session_goes_on(compose_train,
                                                                                     tiny_generate_cli, monkeypatch,
                                                                                     capsys):
    # A long chat on an 8 GB GPU ran out of memory mid-reply, and the session (its conversation too) ended
    cli = tiny_generate_cli
    asked, stream_text = [], cli.stream_text

    def out_of_memory_once(model, tok, prompt, *args, **kwargs):
        asked.append([m["content"] for m in prompt])
        deltas = stream_text(model, tok, prompt, *args, **kwargs)
        yield next(deltas)
        if len(asked) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 7.6 GiB of which 1.2 GiB is free. Including non-PyTorch memory.")
        yield from deltas

    monkeypatch.setattr(cli, "stream_text", out_of_memory_once)
    monkeypatch.setattr(cli, "read_stdin_prompts", lambda: iter(["hi", "yo", "ok"]))
    common = ["ckpt_path=x", "chat=true", "max_new_tokens=4", "temperature=0", "stream=true"]
    replies = cli.generate(compose_train([*common, "interactive=true"], name="generate"))
    assert len(replies) == 2 and asked[2] == ["hi", replies[0], "ok"]  # the conversation before it is kept
    assert ("error: out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "7.6 GiB of which 1.2 GiB is free; the answer is left out") in capsys.readouterr().err

    def broken(model, tok, prompt, *args, **kwargs):
        yield "a"
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "stream_text", broken)
    with pytest.raises(RuntimeError, match="boom"):  # another error is not taken for one
        cli.generate(compose_train([*common, "interactive=true"], name="generate"))
