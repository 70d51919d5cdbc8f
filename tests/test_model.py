import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry_pl import model as model_module
from llmfoundry_pl.config import ConfigError, ModelConfig, llama_hidden_dim
from llmfoundry_pl.interop import hf_names
from llmfoundry_pl.loss import next_token_loss
from llmfoundry_pl.model import (
    Transformer,
    apply_rope,
    attention_mask,
    math_attention,
    packed_positions_and_mask,
    precompute_rope,
)
from tests.helpers.run_if import RunIf


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
    return ModelConfig(**{**base, **overrides})


def test_model_logits_shape():
    m = Transformer(tiny_config())
    assert m(torch.randint(0, 97, (3, 17))).shape == (3, 17, 97)


def test_model_is_causal():
    torch.manual_seed(0)
    m = Transformer(tiny_config()).eval()
    x = torch.randint(0, 97, (1, 20))
    y = x.clone()
    y[0, 12] = (y[0, 12] + 1) % 97  # change one token
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])  # positions before it do not see it
    assert not torch.allclose(a[:, 12:], b[:, 12:])  # positions from it on do


def test_model_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = Transformer(tiny_config(n_heads=4, n_kv_heads=2)).eval()
    mha = Transformer(tiny_config(n_heads=4, n_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd = gqa.config.head_dim
    for key, value in list(state.items()):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = value.view(2, hd, -1)  # (K, Hd, D)
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * hd, -1)  # query heads 0,1 → kv 0; 2,3 → kv 1
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(x), mha(x))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = precompute_rope(head_dim=16, max_seq_len=64, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q, cos[m : m + 1, None], sin[m : m + 1, None])
        kn = apply_rope(k, cos[n : n + 1, None], sin[n : n + 1, None])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    torch.testing.assert_close(score(10, 10), score(0, 0))
    assert not torch.allclose(score(5, 2), score(5, 4))
    # a rotation keeps lengths
    torch.testing.assert_close(apply_rope(q, cos[7:8, None], sin[7:8, None]).norm(), q.norm())


def test_model_parameter_count_matches_formula():
    cfg = tiny_config(dim=64, n_heads=4, n_kv_heads=2, vocab_size=100)
    m = Transformer(cfg)
    hd = cfg.head_dim
    per_layer = 2 * 64 * 64 + 2 * 64 * 2 * hd + 3 * 64 * cfg.hidden_dim + 2 * 64
    expected = cfg.n_layers * per_layer + 64 + 2 * 100 * 64
    assert m.num_params() == expected
    assert m.num_params(non_embedding=True) == expected - 2 * 100 * 64
    tied = Transformer(tiny_config(dim=64, n_heads=4, n_kv_heads=2, vocab_size=100, tie_embeddings=True))
    assert tied.num_params() == expected - 100 * 64


@pytest.mark.parametrize("tied", [False, True])
def test_model_flops_per_token_counts_matmuls_and_attention(tied):
    cfg = tiny_config(tie_embeddings=tied)
    m = Transformer(cfg)
    # the linear layers' weights, the output head counted as a matmul even when it is the embedding table
    weights = sum(layer.weight.numel() for layer in m.modules() if isinstance(layer, nn.Linear))
    assert m.matmul_params() == weights
    assert m.flops_per_token(24) == 6 * weights + 12 * cfg.n_layers * cfg.dim * 24


@pytest.mark.parametrize("tied", [False, True])
def test_model_flops_per_token_is_what_pytorchs_flop_counter_counts(tied):
    # MFU's numerator, checked against an independent count: PyTorch's FLOP counter over a real forward and backward
    # (of the written-out attention: the counter has no formula for the CPU's fused SDPA kernel and counts it as 0)
    from torch.utils.flop_counter import FlopCounterMode

    m = Transformer(tiny_config(attention="math", tie_embeddings=tied))
    with FlopCounterMode(display=False) as counter:
        m(torch.randint(0, 97, (3, 24))).sum().backward()
    assert counter.get_total_flops() == m.flops_per_token(24) * 3 * 24


def test_model_flops_per_token_with_frozen_weights_is_what_pytorchs_flop_counter_counts():
    # LoRA: the weights are frozen, so their gradients are not computed; counted as trained, MFU read 1.39x high
    pytest.importorskip("peft")
    from torch.utils.flop_counter import FlopCounterMode

    from llmfoundry_pl.config import LoraConfig
    from llmfoundry_pl.lora import apply_lora

    m = apply_lora(Transformer(tiny_config(attention="math")), LoraConfig(r=1, targets=["wq", "wv", "w2"]))
    with FlopCounterMode(display=False) as counter:
        m(torch.randint(0, 97, (3, 24))).sum().backward()
    # within the adapters (left out of the count; rank 1, as they are small beside a real model's weights) and the
    # first block's input gradient (not needed, not counted)
    assert counter.get_total_flops() == pytest.approx(m.flops_per_token(24, weights_trained=False) * 3 * 24, rel=0.03)
    assert counter.get_total_flops() < 0.8 * m.flops_per_token(24) * 3 * 24


def test_model_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    m = Transformer(tiny_config(dim=256, n_heads=4, n_kv_heads=4, n_layers=8, init_std=0.02))
    wo, wq = m.layers[0].attention.wo.weight, m.layers[0].attention.wq.weight
    assert wq.std().item() == pytest.approx(0.02, rel=0.05)
    assert wo.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_llama_hidden_dim_rule():
    assert llama_hidden_dim(4096, 256) == 11008  # Llama 2 7B
    assert llama_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert tiny_config(hidden_dim=None, dim=32, multiple_of=16).hidden_dim == 96


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(dim=30, n_heads=4), "model.dim=30 is not divisible by model.n_heads=4"),
        (dict(n_heads=4, n_kv_heads=3), "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
        (dict(dim=36, n_heads=4, n_kv_heads=4), "head_dim"),
        (dict(dropout=1.5), "model.dropout=1.5"),
        (dict(attention="flash"), "model.attention='flash' is not one of auto, sdpa, math"),
        (dict(norm_eps=-1e-5), "model.norm_eps=-1e-05 must be positive"),  # NaN in every norm
        (dict(rope_theta=0.0), "model.rope_theta=0.0 must be positive"),
        (dict(rope_theta=float("inf")), "model.rope_theta=inf must be finite"),  # trained with no rotation at all
        (dict(hidden_dim=0), "model.hidden_dim=0 must be positive"),
        # computed, it rounded to 0: the model ran without its MLPs
        (dict(hidden_dim=None, dim=16, ffn_dim_multiplier=0.02), "ffn_dim_multiplier=0.02 makes the feed-forward"),
    ],
)
def test_model_config_rejects_clashing_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_model_rejects_sequences_longer_than_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len=24"):
        Transformer(tiny_config())(torch.zeros(1, 25, dtype=torch.long))


def test_attention_kernel_follows_the_setting_and_where_attention_runs(monkeypatch):
    choose, bf16, fp32 = model_module.attention_kernel, torch.bfloat16, torch.float32
    monkeypatch.setattr(model_module, "flash_attn_func", None)  # flash-attn not installed
    assert choose("auto", "cpu", bf16, 256) == "math"  # bf16 GEMMs beat the fused CPU kernel's fp32 arithmetic
    assert choose("auto", "cpu", bf16, model_module.MATH_ATTENTION_MAX_KEYS + 1) == "sdpa"  # quadratic memory
    assert choose("auto", "cpu", fp32, 256) == "sdpa"
    assert choose("auto", "cpu", bf16, 256, masked=True) == "sdpa"
    assert choose("auto", "cpu", bf16, 256, compiled=True) == "sdpa"  # Inductor's backward of the math is wrong
    assert choose("auto", "cuda", bf16, 256) == choose("auto", "mps", bf16, 256) == "sdpa"
    monkeypatch.setattr(model_module, "flash_attn_func", object())  # installed
    assert choose("auto", "cuda", bf16, 4096) == choose("auto", "cuda", torch.float16, 64) == "flash_attn"
    assert choose("auto", "cuda", fp32, 256) == choose("auto", "cuda", bf16, 256, masked=True) == "sdpa"
    assert choose("auto", "cpu", bf16, 256) == "math"
    for setting in ("sdpa", "math"):  # an explicit setting is obeyed, everywhere
        assert choose(setting, "cuda", bf16, 4096, masked=True) == choose(setting, "cpu", fp32, 64) == setting


def test_compiled_bf16_training_step_has_eager_gradients():
    """torch.compile of model and loss under CPU bf16 autocast (the cpu profile on a CPU with native bf16) must give
    the gradients eager gives. With attention written out, torch 2.13's Inductor generated a wrong backward kernel
    for head_dim 32 or 64: wk's gradient came out NaN, so ref16m (head_dim 64) diverged at its second step.
    model.attention=auto now keeps SDPA under compile; this shape failed before that."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=256, dim=64, n_heads=2, n_kv_heads=1, max_seq_len=64))  # head_dim 32
    x, y = torch.randint(0, 256, (2, 2, 64))

    def gradients(step) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            step(x, y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def step(x, y):
        return next_token_loss(model, x, y, chunked=False)

    eager, compiled = gradients(step), gradients(torch.compile(step))
    assert torch.isfinite(compiled).all()
    assert ((compiled - eager).norm() / eager.norm()).item() < 0.02  # bf16 rounding: 0.002-0.006 measured


def test_a_left_padded_row_gives_its_prompts_own_logits():
    # Batched prompts line up on the right; each row's positions start at its first real token. Greedy tokens of a
    # near-uniform model at the default init hid a shift of every row's positions by one; its logits do not.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                    init_std=0.3)).eval()
    prompts = [torch.tensor([1, 17, 42, 9, 5, 33]), torch.tensor([1, 7, 3])]
    pad = torch.tensor([0, 3])
    batch = torch.stack([prompts[0], torch.cat([torch.zeros(3, dtype=torch.long), prompts[1]])])
    with torch.no_grad():
        together = model(batch, left_pad=pad)
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(together[row, int(pad[row]):], model(prompt[None])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["causal", "cached_prefix", "left_padded", "packed"])
def test_math_attention_equals_sdpa_with_every_mask_the_model_builds(case):
    """The written-out formula against PyTorch's fused kernel, outputs and gradients, grouped heads (4 query heads on
    2 key/value heads) included."""
    torch.manual_seed(0)
    B, H, K, T, S, Hd = 2, 4, 2, 6, 6, 8
    ours_mask = mask = None  # causal
    if case == "cached_prefix":  # 3 new queries after 3 cached positions: causal, aligned to the last key
        T, mask = 3, attention_mask(3, S - 3, None, torch.device("cpu"))
    elif case == "left_padded":  # batched prompts: row 1 starts with 2 filler slots
        ours_mask = mask = attention_mask(T, 0, torch.tensor([0, 2]), torch.device("cpu"))
    elif case == "packed":  # several examples per row
        ours_mask = mask = packed_positions_and_mask(torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]]))[1]
    q = torch.randn(B, H, T, Hd, requires_grad=True)
    k, v = torch.randn(B, K, S, Hd, requires_grad=True), torch.randn(B, K, S, Hd, requires_grad=True)
    ours = math_attention(q, k, v, ours_mask)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    torch.testing.assert_close(ours, fused)
    for a, b in zip(torch.autograd.grad(ours.square().sum(), (q, k, v)),
                    torch.autograd.grad(fused.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(a, b)


def test_math_attention_drops_probabilities_without_bias():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    exact = math_attention(q, k, v, None)
    dropped = torch.stack([math_attention(q, k, v, None, dropout_p=0.5) for _ in range(2000)])
    assert not torch.equal(dropped[0], exact) and not torch.equal(dropped[0], dropped[1])
    torch.testing.assert_close(dropped.mean(0), exact, atol=0.1, rtol=0)  # kept ones scaled by 1 / (1 - p)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_model_trains_alike_with_the_math_or_sdpa(precision, monkeypatch):
    """Logits and every gradient of the model with ``attention=math`` against ``attention=sdpa``; in bf16 on a CPU,
    ``auto`` picks the math."""
    math_runs = []
    monkeypatch.setattr(model_module, "math_attention",
                        lambda *args, f=model_module.math_attention: math_runs.append(1) or f(*args))
    torch.manual_seed(0)
    cfg = tiny_config(dim=64, n_heads=4, n_kv_heads=2)
    fused = Transformer(dataclasses.replace(cfg, attention="sdpa"))
    written = Transformer(dataclasses.replace(cfg, attention="math" if precision == "32-true" else "auto"))
    written.load_state_dict(fused.state_dict())
    x = torch.randint(0, 97, (3, 24))
    logits, grads = [], []
    for model in (fused, written):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            out = model(x)
        out.float().logsumexp(-1).mean().backward()
        logits.append(out.float())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(math_runs) == cfg.n_layers  # the written model really ran the math, once per block
    tol = {} if precision == "32-true" else dict(atol=3e-2, rtol=3e-2)  # bf16: 8 bits of mantissa
    torch.testing.assert_close(logits[1], logits[0], **tol)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name, **tol)


@RunIf(min_gpus=1, bf16_cuda=True, package="flash_attn")
def test_flash_attn_matches_sdpa_on_gpu(monkeypatch):
    torch.manual_seed(0)
    m = Transformer(tiny_config(dim=128, n_heads=4, n_kv_heads=2)).cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, 97, (2, 24), device="cuda")
    flash = m(x)
    monkeypatch.setattr(model_module, "flash_attn_func", None)
    torch.testing.assert_close(flash, m(x), atol=2e-2, rtol=2e-2)


def test_against_hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=101, dim=64, n_layers=3, n_heads=8, n_kv_heads=2, max_seq_len=32, rope_theta=5000.0)
    ours = Transformer(cfg).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    # The package's one name table (Meta names → Hugging Face's); no permutation, as model.py pairs RoPE channels
    # as HF does.
    hf_state = hf.state_dict()
    ours.load_state_dict({ours_name: hf_state[hf_name] for ours_name, hf_name in hf_names(cfg.n_layers).items()})
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # with dropout: the recomputation must replay the same masks
def test_activation_checkpointing_gives_the_gradients_of_the_plain_run(dropout):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=16, dropout=dropout)
    plain = Transformer(cfg).train()
    recomputed = Transformer(dataclasses.replace(cfg, activation_checkpointing=True)).train()
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (2, 16))
    grads, block_runs = [], []
    for model in (plain, recomputed):
        runs, block = [], model.layers[0]
        block.forward = lambda *args, f=block.forward, runs=runs: runs.append(1) or f(*args)  # count its runs
        torch.manual_seed(1)  # same dropout masks in both runs
        model(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        block_runs.append(len(runs))
    assert block_runs == [1, 2]  # checkpointing really recomputed the block in backward
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize(("dim", "n_heads", "n_kv_heads"), [(32, 3, 2), (250, 8, None), (384, 5, 2), (96, 5, 3),
                                                            (250, 4, 2), (251, 4, None)])
def test_the_head_count_a_shape_error_suggests_passes_every_check(dim, n_heads, n_kv_heads):
    # it suggested a divisor of dim alone, which the next checks refused: 5 heads under the tiny preset's 2 key/value
    # heads ("not divisible by model.n_kv_heads=2"), 10 heads of 25 channels ("head_dim ... is odd")
    with pytest.raises(ConfigError) as error:
        ModelConfig(vocab_size=64, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
    message = str(error.value)
    if suggested := re.search(r"\(e\.g\. (\d+)\)$", message):
        ModelConfig(vocab_size=64, dim=dim, n_heads=int(suggested[1]), n_kv_heads=n_kv_heads)
    else:  # no head count fits this dim: a dim that has one is asked for
        multiple = int(re.search(r"divisible by (\d+)$", message)[1]) if n_kv_heads else 2
        assert message.endswith(f"divisible by {multiple}" if n_kv_heads else "pick an even model.dim")
        ModelConfig(vocab_size=64, dim=dim - dim % multiple, n_heads=n_kv_heads or 1, n_kv_heads=n_kv_heads)
