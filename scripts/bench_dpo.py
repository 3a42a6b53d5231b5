"""TRL counterpart of `fdpo bench dpo` (dev-time only): TRL's DPOTrainer on
the same freshly initialised model and the same shape of data — --batch
pairs per step, prompts of --seq/2 tokens, chosen and rejected responses of
--seq/2 tokens (TRL appends EOS: one more) — with the reference log-probs
precomputed, so a step is policy forward + backward on chosen and rejected
and AdamW, as in fdpo. Step time is taken between TRL's step callbacks.

With --pairs FILE (written by `fdpo bench dpo --lengths PROFILE
--write-lengths FILE`), the pairs have exactly fdpo's lengths, in fdpo's
order (the sampler is sequential): step s takes pairs s·batch.. Each
response's text is one token shorter, since TRL appends EOS. Tokens/s
counts Σ (P + C) + (P + R) per pair, as fdpo does.

    python scripts/bench_dpo.py --arch llama --vocab 4096 --hidden 256 --layers 6 \\
        --heads 8 --intermediate 688 --batch 8 --seq 128 --steps 10 --threads 2
"""
import argparse
import json
import os
import random
import resource
import tempfile
import time
import warnings

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, TrainerCallback)
from trl import DPOConfig, DPOTrainer

warnings.filterwarnings("ignore")
p = argparse.ArgumentParser()
p.add_argument("--arch", default="llama", choices=["llama", "gpt2", "qwen2"])
p.add_argument("--vocab", type=int, default=4096)
p.add_argument("--hidden", type=int, default=256)
p.add_argument("--layers", type=int, default=6)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--kv-heads", type=int, default=None)
p.add_argument("--intermediate", type=int, default=688)
p.add_argument("--pairs", default=None, help="JSON [[prompt, chosen, rejected], ...] lengths")
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
    embedding = {"llama": a.vocab * a.hidden, "qwen2": 0}.get(a.arch, positions * a.hidden)
    return 6 * (params - embedding) + 12 * a.layers * a.seq * a.hidden

if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)
random.seed(0)
lengths = json.load(open(a.pairs)) if a.pairs else None
positions = (max(p + max(c, r) for p, c, r in lengths) if lengths else a.seq) + 2
if a.arch == "llama":
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads or a.heads,
                      max_position_embeddings=positions, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
elif a.arch == "qwen2":
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads or a.heads,
                      max_position_embeddings=positions, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
else:
    cfg = GPT2Config(vocab_size=a.vocab, n_positions=positions, n_embd=a.hidden, n_layer=a.layers,
                     n_head=a.heads, n_inner=a.intermediate, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)

# A word-level tokenizer: word "wN" is token N, so lengths are exact.
words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(2, a.vocab)]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
p_len, r_len = a.seq // 2, a.seq - a.seq // 2


def text(n):
    return " ".join(f"w{random.randrange(2, a.vocab)}" for _ in range(n))


if lengths:
    rows = [{"prompt": text(p), "chosen": " " + text(c - 1), "rejected": " " + text(r - 1)} for p, c, r in lengths]
    need = a.batch * (a.steps + 2)
    if len(rows) < need:
        raise SystemExit(f"{a.pairs}: {len(rows)} pairs, --batch x (--steps + 2) = {need} needed")
else:
    rows = [{"prompt": text(p_len), "chosen": " " + text(r_len), "rejected": " " + text(r_len)}
            for _ in range(a.batch * (a.steps + 2))]
    lengths = [(p_len, r_len, r_len)] * len(rows)  # as fdpo counts a uniform step


class InOrder(DPOTrainer):
    """DPOTrainer taking the pairs in file order, as fdpo does."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class Timer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t0)


timer = Timer()
with tempfile.TemporaryDirectory() as out:
    args = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.steps + 2,
                     learning_rate=1e-4, weight_decay=0.01, beta=0.1, precompute_ref_log_probs=True,
                     max_length=positions, logging_steps=10_000, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
                     # f32 like fdpo: TRL's DPOConfig defaults to bf16 mixed precision,
                     # emulated (~150x slower) on CPUs without AVX-512 BF16.
                     bf16=False, fp16=False)
    trainer = InOrder(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.train()
steps = timer.times[2:]
step_s = sum(steps) / len(steps)
# What a padded step computes besides its padding, averaged over the timed steps.
timed = lengths[2 * a.batch:(a.steps + 2) * a.batch]
tokens = sum(2 * p + c + r for p, c, r in timed) / a.steps
import trl  # noqa: E402

report = {
    "implementation": f"trl {trl.__version__} / pytorch {torch.__version__}",
    "benchmark": "dpo",
    "arch": a.arch,
    "params": sum(p.numel() for p in model.parameters()),
    "threads": torch.get_num_threads(),
    "pairs": a.batch,
    "seq": a.seq,
    "tokens_per_step": tokens,
    "step_ms": 1e3 * step_s,
    "tokens_per_s": tokens / step_s,
    "gflops_per_s": flops_per_token(sum(p.numel() for p in model.parameters())) * tokens / step_s / 1e9,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}
if a.pairs:
    del report["gflops_per_s"]  # the FLOP count assumes --seq-token sequences
    report["lengths"] = a.pairs
if a.json:
    print(json.dumps(report))
else:
    print(f"TRL DPOTrainer, {a.arch}, {report['params'] / 1e6:.1f}M params, {a.batch} pairs x {a.seq} tokens: "
          f"step {report['step_ms']:.1f} ms, {report['tokens_per_s']:.0f} tokens/s, "
          f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
