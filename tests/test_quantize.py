"""Quantized and half-precision inference (llmfoundry_pl/inference/quantize.py): logits near fp32's by what each bit
width allows, weights that really shrink, lfpl-generate / lfpl-eval with quantize= and precision= on a model folder,
and served requests."""

from __future__ import annotations

import builtins
import copy
import json

import pytest
import torch

from llmfoundry_pl.cli.eval import evaluate
from llmfoundry_pl.cli.generate import generate
from llmfoundry_pl.cli.serve import serve
from llmfoundry_pl.config import ConfigError, ModelConfig
from llmfoundry_pl.data.corpus import bundled_corpus_dir
from llmfoundry_pl.inference import generate_stream
from llmfoundry_pl.inference.quantize import check_quantize_device, for_inference, quantize, weight_bytes
from llmfoundry_pl.interop import save_safetensors
from llmfoundry_pl.model import Transformer
from llmfoundry_pl.serve.engine import Engine, Request, SamplingParams
from llmfoundry_pl.tokenizer import Tokenizer, train_tokenizer

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")

# The relative error of the logits, ‖q − fp32‖ / ‖fp32‖, each mode must stay under: about twice the rounding error
# of one layer. int8 with a scale per row of ~100 normal weights (max ≈ 3σ) rounds to steps of 6σ/255, an error
# of 0.7% of σ; int8 also rounds the activations, to 7 bits with one scale for the whole tensor (fbgemm), ~3× more;
# int4 rounds each group of 32 to 15 steps, ~8%. (Measured: 0.7%, 2.2%, 8.8%.) And the bytes each keeps per linear
# weight: 1 (int8) or 0.5 (int4), plus scales (int4: a fp32 scale and zero point per 32 weights, 0.25 more).
BOUNDS = {"int8": (0.045, 1.0), "int8_weight": (0.015, 1.0), "int4_weight": (0.16, 0.5)}


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=400, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    return Transformer(cfg).eval()


def linear_weights(model: Transformer) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("mode", BOUNDS)
def test_quantize_keeps_logits_close_and_shrinks_the_linear_weights(model, mode):
    tokens = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens)
        quantized = quantize(copy.deepcopy(model), mode)
        logits = quantized(tokens)
    bound, bytes_per_weight = BOUNDS[mode]
    error = ((logits - reference).norm() / reference.norm()).item()
    assert 0 < error < bound  # changed (really quantized), but only by what the bit width allows
    assert weight_bytes(model) == 4 * model.num_params()  # fp32: 4 bytes a parameter
    other = 4 * (model.num_params() - linear_weights(model))  # embedding and norms stay fp32
    per_weight = (weight_bytes(quantized) - other) / linear_weights(model)
    assert bytes_per_weight <= per_weight < bytes_per_weight * 1.6


def test_quantize_refusals_are_one_line(model, monkeypatch):
    with pytest.raises(ConfigError, match="quantize=int3 is not one of none, int8, int8_weight, int4_weight"):
        quantize(model, "int3")
    for mode in ("int8", "int8_weight", "int4_weight"):  # int8_weight's refusal (on MPS, say) was a KeyError
        with pytest.raises(ConfigError, match=f"quantize={mode} does not run on meta: .*kernels.*; run on the CPU"):
            quantize(copy.deepcopy(model).to("meta"), mode)
    # a mode that runs on that device is named (on MPS, none does)
    with pytest.raises(ConfigError, match="quantize=int8 does not run on cuda: .*; use quantize=int8_weight, or run "):
        check_quantize_device("int8", "cuda")
    narrow = Transformer(ModelConfig(vocab_size=50, dim=48, n_layers=1, n_heads=4, max_seq_len=8))
    with pytest.raises(ConfigError, match="input width is a multiple of 32 and output width a multiple of 16; "
                                          "layers.0.attention.wq maps 48 to 48"):
        quantize(narrow, "int4_weight")
    # an output head of a vocabulary that is not a multiple of 16 (32001, say) was torch's traceback
    odd_vocab = Transformer(ModelConfig(vocab_size=341, dim=64, n_layers=1, n_heads=4, max_seq_len=8))
    with pytest.raises(ConfigError, match="output width a multiple of 16; output maps 64 to 341: use int8_weight"):
        quantize(odd_vocab, "int4_weight")
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match=r"quantize=int8_weight needs torchao: pip install 'llmfoundry-pl\[quant\]'"):
        quantize(copy.deepcopy(model), "int8_weight")


# Half precision rounds every weight and activation: bf16 keeps 8 bits of mantissa (relative step 2^-8), fp16 11.
HALF_BOUNDS = {"bf16-true": (torch.bfloat16, 0.03), "16-true": (torch.float16, 0.004)}


@pytest.mark.parametrize("precision", HALF_BOUNDS)
def test_half_precision_halves_the_weights_and_keeps_logits_close(model, precision, monkeypatch):
    dtype, bound = HALF_BOUNDS[precision]
    if precision == "16-true":  # refused on a CPU without fp16 instructions (60-400x slower): this model is tiny
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
        with pytest.raises(ConfigError, match="^precision=16-true needs fp16 matmuls, and this CPU has no fp16"):
            for_inference(copy.deepcopy(model), torch.device("cpu"), precision)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    tokens = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    half = for_inference(copy.deepcopy(model), torch.device("cpu"), precision)
    assert {p.dtype for p in half.parameters()} == {dtype}
    assert weight_bytes(half) == 2 * model.num_params()
    with torch.no_grad():
        reference, logits = model(tokens), half(tokens)
    error = ((logits - reference).norm() / reference.norm()).item()
    assert 0 < error < bound
    # Decoding runs on it, the KV cache in its dtype; a weight-only mode quantizes the half weights.
    assert len(list(generate_stream(half, [1, 2, 3], 5, temperature=0))) == 5
    both = for_inference(copy.deepcopy(model), torch.device("cpu"), precision, "int8_weight")
    with torch.no_grad():
        logits = both(tokens)  # fp32: the model's output head returns fp32 logits whatever its dtype
    error = ((logits - reference).norm() / reference.norm()).item()
    assert logits.dtype == torch.float32 and 0 < error < bound + BOUNDS["int8_weight"][0]  # the two roundings add up
    with pytest.raises(ConfigError, match="^quantize=int8 runs PyTorch's integer kernels between fp32 activations"):
        for_inference(copy.deepcopy(model), torch.device("cpu"), precision, "int8")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(sorted(bundled_corpus_dir().glob("*.txt"))[0].read_text().splitlines(), vocab_size=400)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, tokenizer) -> str:
    """The model with a tokenizer, as lfpl-export format=safetensors writes it."""
    path = tmp_path_factory.mktemp("model") / "model"
    save_safetensors(model, tokenizer, path)
    return str(path)


def test_weight_only_modes_keep_served_requests_independent(model, tokenizer):
    """lfpl-serve's engine decodes requests together; with weights alone quantized, each row still computes what it
    would alone (int8 is not tested here: its activation scale is shared by the batch, see quantize.py)."""
    quantized = quantize(copy.deepcopy(model), "int8_weight")
    prompts = ["ROMEO:", "A", "To be or not to be, that is", "Full fathom five"]
    alone = [list(generate_stream(quantized, tokenizer.encode(p, bos=True), 10, eos_id=tokenizer.eos_id,
                                  temperature=0)) for p in prompts]
    requests = [Request(tokenizer.encode(p, bos=True), SamplingParams(max_tokens=10, temperature=0), tokenizer.eos_id,
                        tokenizer, lambda delta, reason: None) for p in prompts]
    engine = Engine(quantized, tokenizer, max_batch=2)
    for step in range(40):  # two arrive at once, two later: rows are filled, freed and reused mid-flight
        for request in requests[:2] if step == 0 else requests[2:] if step == 3 else []:
            engine.submit(request)
        engine.step()
    assert [r.output_ids for r in requests] == alone


def test_generate_and_eval_commands_with_each_mode(folder, compose_train, capsys, tmp_path):
    """lfpl-generate and lfpl-eval as their entry points run them (composed config → generate / evaluate)."""
    text = tmp_path / "verse.txt"
    text.write_text(sorted(bundled_corpus_dir().glob("*.txt"))[4].read_text()[:3000])
    records, texts = {}, {}
    for mode in ("none", *BOUNDS):
        texts[mode] = generate(compose_train([f"ckpt_path={folder}", "prompt=ROMEO:", "max_new_tokens=8",
                                              "temperature=0", "device=cpu", f"quantize={mode}"], name="generate"))
        evaluate(compose_train([f"ckpt_path={folder}", f"data.path={text}", "accelerator=cpu", f"quantize={mode}"],
                               name="eval"))
        out = capsys.readouterr().out
        assert out.startswith("ROMEO:" + texts[mode][0])
        records[mode] = json.loads(out.strip().splitlines()[-1])
    assert texts["int8_weight"] == texts["none"]  # greedy: an error of 0.7% does not change these 8 tokens
    for mode in BOUNDS:
        assert records[mode]["quantize"] == mode and records[mode]["weight_bytes"] < records["none"]["weight_bytes"]
        assert records[mode]["val/bpb"] == pytest.approx(records["none"]["val/bpb"], rel=0.02)
    # Half precision, alone and under a weight-only mode (quantized in bf16, as lfpl-generate does it).
    half = generate(compose_train([f"ckpt_path={folder}", "prompt=ROMEO:", "max_new_tokens=8", "temperature=0",
                                   "device=cpu", "precision=bf16-true"], name="generate"))
    assert capsys.readouterr().out.startswith("ROMEO:" + half[0])
    evaluate(compose_train([f"ckpt_path={folder}", f"data.path={text}", "accelerator=cpu", "precision=bf16-true",
                            "quantize=int8_weight"], name="eval"))
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["val/bpb"] == pytest.approx(records["none"]["val/bpb"], rel=0.02)
    with pytest.raises(ConfigError, match="^quantize=int8 runs PyTorch's integer kernels"):  # not a kernel's error
        evaluate(compose_train([f"ckpt_path={folder}", f"data.path={text}", "accelerator=cpu", "precision=bf16-true",
                                "quantize=int8"], name="eval"))


def test_fp16_is_refused_on_a_cpu_without_fp16_instructions(folder, compose_train, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    text = tmp_path / "verse.txt"
    text.write_text(sorted(bundled_corpus_dir().glob("*.txt"))[4].read_text()[:3000])
    for command, name, where in [(generate, "generate", ["device=cpu"]),
                                 (evaluate, "eval", ["accelerator=cpu", f"data.path={text}"])]:
        with pytest.raises(ConfigError, match="^precision=16-true needs fp16 matmuls, and this CPU has no fp16"):
            command(compose_train([f"ckpt_path={folder}", *where, "precision=16-true"], name=name))


@pytest.mark.parametrize(("command", "name"), [(generate, "generate"), (evaluate, "eval"), (serve, "serve")])
def test_quantize_typo_fails_before_the_model_is_loaded(compose_train, command, name):
    # ckpt_path does not exist: loading first would fail with that error instead of this one
    with pytest.raises(ConfigError, match="^quantize=int3 is not one of none, int8, int8_weight, int4_weight$"):
        command(compose_train(["ckpt_path=no/such/model", "quantize=int3"], name=name))
    if name != "eval":  # lfpl-eval takes the mixed precisions too (its Trainer runs autocast)
        with pytest.raises(ConfigError, match="^precision=bf16-mixed is not one of 32-true, bf16-true, 16-true$"):
            command(compose_train(["ckpt_path=no/such/model", "precision=bf16-mixed"], name=name))
    else:
        with pytest.raises(ConfigError, match="^precision=bf17 is not one of 32-true, bf16-true, 16-true, bf16-mixed"):
            command(compose_train(["ckpt_path=no/such/model", "precision=bf17"], name=name))
        # int8's and int4's layers take one activation dtype, and autocast hands them another
        with pytest.raises(ConfigError, match="^quantize=int8 does not run under autocast .*use precision=32-true$"):
            command(compose_train(["ckpt_path=no/such/model", "quantize=int8", "precision=bf16-mixed"], name=name))
