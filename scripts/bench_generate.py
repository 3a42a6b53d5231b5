"""transformers counterpart of `fdpo bench generate` (dev-time only): --batch
random prompts of --seq/2 tokens, each continued by exactly --seq/2 sampled
tokens with the KV cache (`generate`, do_sample, temperature 1).

    python scripts/bench_generate.py --arch llama --batch 8 --seq 128 --steps 3 --threads 2
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
p.add_argument("--steps", type=int, default=3)
p.add_argument("--threads", type=int, default=None)
p.add_argument("--json", action="store_true")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)
if a.arch == "llama":
    model = LlamaForCausalLM(LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                         num_key_value_heads=a.heads, max_position_embeddings=a.seq,
                                         tie_word_embeddings=False))
else:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=a.vocab, n_positions=a.seq, n_embd=a.hidden, n_layer=a.layers,
                                       n_head=a.heads, n_inner=a.intermediate))
model.eval()
p_len, new = a.seq // 2, a.seq - a.seq // 2
ids = torch.randint(0, a.vocab, (a.batch, p_len))
kw = dict(do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new, min_new_tokens=new, use_cache=True,
          pad_token_id=0, eos_token_id=None)
with torch.no_grad():
    model.generate(ids, **kw)
    t0 = time.perf_counter()
    generated = 0
    for _ in range(a.steps):
        out = model.generate(ids, **kw)
        generated += (out.shape[1] - p_len) * a.batch
    seconds = time.perf_counter() - t0
report = {"implementation": f"transformers / pytorch {torch.__version__}", "benchmark": "generate", "batch": a.batch,
          "prompt_tokens": p_len, "new_tokens": new, "tokens_per_s": generated / seconds,
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
if a.json:
    print(json.dumps(report))
else:
    print(f"transformers generate, {a.batch} prompts x {p_len} tokens + {new} new: {report['tokens_per_s']:.0f} tokens/s, "
          f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
