"""PyTorch counterpart of `fdpo bench train` (dev-time only): same arguments,
same figures, so that fdpo's ratio to PyTorch is read on one machine.

    python scripts/bench_train.py --arch llama --vocab 4096 --hidden 256 --layers 6 \\
        --heads 8 --intermediate 688 --batch 8 --seq 128 --steps 10 --threads 2
"""
import argparse
import json
import resource
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
p.add_argument("--vocab", type=int, default=4096)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=6)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--intermediate", type=int, default=688)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--steps", type=int, default=10)
p.add_argument("--threads", type=int, default=None)
p.add_argument("--json", action="store_true")
a = p.parse_args()


def flops_per_token(params):
    """As fdpo's bench: 6 per matrix-multiply weight (not the input
    embedding; GPT-2's tied wte is its output projection) + 12·seq·hidden
    per layer for the attention products."""
    embedding = a.vocab * a.hidden if a.arch == "llama" else positions * a.hidden
    return 6 * (params - embedding) + 12 * a.layers * a.seq * a.hidden

positions = a.seq
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.arch == "llama":
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      max_position_embeddings=a.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
else:
    cfg = GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=a.hidden, n_layer=a.layers, n_head=a.heads,
                     n_inner=a.intermediate, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
ids = torch.randint(0, a.vocab, (a.batch, a.seq))
inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)
fwd = bwd = step = 0.0
for s in range(a.steps + 2):
    t0 = time.perf_counter()
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, a.vocab), targets)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if s >= 2:
        fwd += t1 - t0
        bwd += t2 - t1
        step += t3 - t2
n = a.steps
tokens = a.batch * (a.seq - 1)
train_step = (fwd + bwd + step) / n
with torch.no_grad():
    t0 = time.perf_counter()
    for _ in range(n):
        model(input_ids=inputs).logits.max(-1).values.sum().item()
    forward_only = (time.perf_counter() - t0) / n
report = {
    "implementation": f"pytorch {torch.__version__}",
    "arch": a.arch,
    "params": sum(p.numel() for p in model.parameters()),
    "threads": torch.get_num_threads(),
    "batch": a.batch,
    "seq": a.seq,
    "forward_ms": 1e3 * fwd / n,
    "backward_ms": 1e3 * bwd / n,
    "optimizer_ms": 1e3 * step / n,
    "tokens_per_s": tokens / train_step,
    "gflops_per_s": flops_per_token(sum(p.numel() for p in model.parameters())) * tokens / train_step / 1e9,
    "forward_tokens_per_s": tokens / forward_only,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}
if a.json:
    print(json.dumps(report))
else:
    print(f"pytorch {a.arch}, {report['params'] / 1e6:.1f}M params, batch {a.batch}x{a.seq}: step "
          f"{1e3 * train_step:.1f} ms (fwd {report['forward_ms']:.1f}, bwd {report['backward_ms']:.1f}, "
          f"AdamW {report['optimizer_ms']:.1f}), {report['tokens_per_s']:.0f} tokens/s train, "
          f"{report['forward_tokens_per_s']:.0f} tokens/s forward, peak RSS "
          f"{report['peak_rss_bytes'] / 2**20:.0f} MiB")
