"""The baseline the default ``lfpl-train`` run is measured against: nanoGPT's documented CPU recipe.

nanoGPT's README trains a character-level GPT on Shakespeare on a CPU with
``--n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=12 --dropout=0.0`` (lr 1e-3, AdamW betas
(0.9, 0.99), weight decay 0.1, 100 warmup iterations, cosine decay to 1e-4, gradient clipping 1.0). This script
re-creates that recipe in a few lines (GPT-2 blocks: LayerNorm, learned positions, GELU MLP, tied embedding), trains
it for a wall-clock budget on the *same* split llmfoundry-pl uses (the last 5% of each bundled play held out), and
reports held-out bits per byte (the text is ASCII: one character is one byte).

    python docs/baselines/nanogpt_cpu_recipe.py 240      # seconds of training; see docs/benchmarks.md

Not part of the package: a reference point only, written from the recipe's published settings.
"""

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from llmfoundry_pl.data.corpus import bundled_corpus_dir

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100


def load_split(val_fraction: float = 0.05) -> tuple[str, str]:
    train, val = [], []
    for path in sorted(bundled_corpus_dir().glob("*.txt")):
        text = path.read_text()
        cut = len(text) - math.ceil(len(text) * val_fraction)
        train.append(text[:cut])
        val.append(text[cut:])
    return "".join(train), "".join(val)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(N_EMBD), nn.LayerNorm(N_EMBD)
        self.qkv, self.proj = nn.Linear(N_EMBD, 3 * N_EMBD), nn.Linear(N_EMBD, N_EMBD)
        self.fc, self.fc_proj = nn.Linear(N_EMBD, 4 * N_EMBD), nn.Linear(4 * N_EMBD, N_EMBD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, N_EMBD), nn.Embedding(BLOCK, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scaled = name.endswith(("proj.weight", "fc_proj.weight"))
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * N_LAYER) if scaled else 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))


def train_step(model, optimizer, data, lr) -> None:
    ix = torch.randint(len(data) - BLOCK - 1, (BATCH,))
    x = torch.stack([data[i : i + BLOCK] for i in ix])
    y = torch.stack([data[i + 1 : i + BLOCK + 1] for i in ix])
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def main(budget_s: float) -> None:
    train_text, val_text = load_split()
    stoi = {c: i for i, c in enumerate(sorted(set(train_text + val_text)))}
    train = torch.tensor([stoi[c] for c in train_text])
    val = torch.tensor([stoi[c] for c in val_text])

    # Calibrate: how many iterations fit the budget? The schedule then spans exactly those iterations.
    torch.manual_seed(1337)
    probe = GPT(len(stoi))
    probe_opt, t0, n = make_optimizer(probe), time.perf_counter(), 0
    while time.perf_counter() - t0 < 5:
        train_step(probe, probe_opt, train, LR)
        n += 1
    max_iters = int(n * budget_s / (time.perf_counter() - t0))

    torch.manual_seed(1337)
    model = GPT(len(stoi))
    optimizer = make_optimizer(model)
    t0 = time.perf_counter()
    for it in range(max_iters):
        progress = min(max(it - WARMUP, 0) / max(max_iters - WARMUP, 1), 1.0)
        lr = LR * (it + 1) / (WARMUP + 1) if it < WARMUP else MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (
            LR - MIN_LR)
        train_step(model, optimizer, train, lr)
    seconds = time.perf_counter() - t0

    model.eval()
    nats, count = 0.0, 0
    with torch.no_grad():  # every held-out character predicted once
        for s in range(0, len(val) - 1, BLOCK):
            y = val[s + 1 : s + BLOCK + 1]
            logits = model(val[s : s + len(y)][None])[0]
            nats += F.cross_entropy(logits, y, reduction="sum").item()
            count += len(y)
    print(f"nanoGPT CPU recipe: {max_iters} iterations in {seconds:.1f} s ({max_iters * BATCH * BLOCK / seconds:,.0f} "
          f"chars/s); held-out loss {nats / count:.4f} nats/char = {nats / count / math.log(2):.4f} bits per byte")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 240.0)
