//! `fdpo bench train`: time of a training step (forward, backward, AdamW)
//! and of a forward pass of a freshly initialised model, tokens/s and peak
//! memory; `fdpo bench dpo`: the same for the f-DPO step (policy forward and
//! backward on chosen and rejected, cached reference log-probs, AdamW).
//! `scripts/bench_train.py` and `scripts/bench_dpo.py` (TRL's DPOTrainer)
//! take the same arguments and print the same figures, so the ratio is read
//! on one machine.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use clap::{Args, Subcommand, ValueEnum};
use fdpo_model::config::{Gpt2Config, LlamaConfig, ModelConfig};
use fdpo_model::{CausalLm, Weights};
use serde_json::json;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Training step (forward + backward + AdamW) and forward throughput.
    Train(TrainBenchArgs),
    /// f-DPO step: --batch pairs, prompt --seq/2 tokens, responses --seq/2
    /// tokens each, or lengths drawn from a profile of real data (--lengths).
    Dpo(DpoBenchArgs),
    /// Achieved GFLOP/s of a large f32 matrix product: the machine's practical peak.
    Gemm(GemmBenchArgs),
    /// Sampling with the KV cache: --batch prompts of --seq/2 tokens, --seq/2 new tokens each.
    Generate(TrainBenchArgs),
}

/// Arguments of `fdpo bench gemm`.
#[derive(Debug, Args)]
pub struct GemmBenchArgs {
    /// Matrix size n (an n×n by n×n product).
    #[arg(long, default_value_t = 2048, value_parser = crate::cmd::parse::at_least_one)]
    pub size: usize,
    /// A product of another shape, `MxKxN` (an M×K by K×N product; overrides
    /// --size), e.g. 1024x256x768 for a layer of the 6.8M training step.
    #[arg(long, value_parser = crate::cmd::parse::gemm_shape)]
    pub shape: Option<(usize, usize, usize)>,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 5, value_parser = crate::cmd::parse::at_least_one)]
    pub steps: usize,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl BenchCommand {
    /// Runs the benchmark.
    pub fn run(self) -> Result<()> {
        match self {
            BenchCommand::Train(a) => run_train(a),
            BenchCommand::Dpo(a) => run_dpo(a),
            BenchCommand::Gemm(a) => run_gemm(a),
            BenchCommand::Generate(a) => run_generate(a),
        }
    }
}

/// Arguments of `fdpo bench dpo`.
#[derive(Debug, Args)]
pub struct DpoBenchArgs {
    /// Model and step settings; --seq caps prompt + response.
    #[command(flatten)]
    pub model: TrainBenchArgs,
    /// Prompt and response lengths: uniform (--seq/2 each) or drawn from a
    /// log-normal profile of a public preference set: hh, ultrafeedback,
    /// capybara, tldr.
    #[arg(long, value_enum, default_value = "uniform")]
    pub lengths: LengthProfile,
    /// Micro-batch layout: shared (packed, prompts shared), packed (packed,
    /// each response with its own prompt) or padded (one right-padded row each).
    #[arg(long, value_enum, default_value = "shared")]
    pub layout: Layout,
    /// Write the pairs' lengths (JSON, [[prompt, chosen, rejected], …], one
    /// step's --batch pairs after another) for `scripts/bench_dpo.py --pairs`.
    #[arg(long)]
    pub write_lengths: Option<std::path::PathBuf>,
}

/// Length profiles: medians (tokens) of prompt and response and the
/// log-normal σ of both; a pair's chosen and rejected are drawn apart.
#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
pub enum LengthProfile {
    /// --seq/2 + --seq/2, every pair alike.
    Uniform,
    /// Anthropic HH: prompt:completion 2.15, median total ~186 tokens.
    Hh,
    /// UltraFeedback: prompt:completion 0.42 (long answers).
    Ultrafeedback,
    /// Capybara (multi-turn): prompt:completion 1.59.
    Capybara,
    /// TL;DR summarisation: prompt:completion 11.1, median total ~416.
    Tldr,
}

impl LengthProfile {
    /// (median prompt, median response, σ), or None for uniform.
    fn shape(self) -> Option<(f64, f64, f64)> {
        match self {
            LengthProfile::Uniform => None,
            LengthProfile::Hh => Some((127.0, 59.0, 0.6)),
            LengthProfile::Ultrafeedback => Some((127.0, 302.0, 0.6)),
            LengthProfile::Capybara => Some((240.0, 151.0, 0.6)),
            LengthProfile::Tldr => Some((382.0, 34.0, 0.6)),
        }
    }

    /// `n` (prompt, chosen, rejected) lengths, each sequence (prompt +
    /// response) at most `seq` tokens (the response cut first, as TRL's
    /// keep_start), every part at least 2 tokens (TRL appends EOS to a
    /// response: its text is one token shorter).
    pub fn draw(self, n: usize, seq: usize, seed: u64) -> Vec<[usize; 3]> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, LogNormal};
        let Some((prompt, response, sigma)) = self.shape() else {
            return vec![[seq / 2, seq - seq / 2, seq - seq / 2]; n];
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (p, r) = (
            LogNormal::new(prompt.ln(), sigma).expect("finite σ"),
            LogNormal::new(response.ln(), sigma).expect("finite σ"),
        );
        let seq = seq.max(4);
        (0..n)
            .map(|_| {
                let prompt = (p.sample(&mut rng).round() as usize).clamp(2, seq - 2);
                let mut side = || (r.sample(&mut rng).round() as usize).clamp(2, seq - prompt);
                [prompt, side(), side()]
            })
            .collect()
    }
}

/// Micro-batch layouts of `fdpo bench dpo`.
#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
pub enum Layout {
    /// Packed without padding, a pair's prompt computed once.
    Shared,
    /// Packed without padding, each response with its own prompt.
    Packed,
    /// One right-padded row per (prompt, response).
    Padded,
}

impl Layout {
    fn batching(self) -> fdpo_model::packing::Batching {
        use fdpo_model::packing::Batching;
        match self {
            Layout::Shared => Batching::default(),
            Layout::Packed => Batching { padding_free: true, prefix_sharing: false },
            Layout::Padded => Batching::PADDED,
        }
    }
}

/// Model families the benchmark can build.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Arch {
    /// Llama (RMSNorm, RoPE, SwiGLU).
    Llama,
    /// GPT-2.
    Gpt2,
    /// Qwen2 (Llama with q/k/v biases and tied embeddings; --kv-heads for
    /// grouped queries).
    Qwen2,
}

/// Arguments of `fdpo bench train`.
#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Model family.
    #[arg(long, value_enum, default_value = "llama")]
    pub arch: Arch,
    /// Vocabulary size.
    #[arg(long, default_value_t = 4096, value_parser = crate::cmd::parse::at_least_one)]
    pub vocab: usize,
    /// Hidden size.
    #[arg(long, default_value_t = 256, value_parser = crate::cmd::parse::at_least_one)]
    pub hidden: usize,
    /// Layers.
    #[arg(long, default_value_t = 6, value_parser = crate::cmd::parse::at_least_one)]
    pub layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8, value_parser = crate::cmd::parse::at_least_one)]
    pub heads: usize,
    /// Key/value heads (Llama and Qwen2; default: --heads).
    #[arg(long, value_parser = crate::cmd::parse::at_least_one)]
    pub kv_heads: Option<usize>,
    /// MLP width.
    #[arg(long, default_value_t = 688, value_parser = crate::cmd::parse::at_least_one)]
    pub intermediate: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 8, value_parser = crate::cmd::parse::at_least_one)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = crate::cmd::parse::at_least_one)]
    pub seq: usize,
    /// Timed steps (after 2 warm-up steps; 1 for `bench generate`).
    #[arg(long, default_value_t = 10, value_parser = crate::cmd::parse::at_least_one)]
    pub steps: usize,
    /// Threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Floating-point operations per token of a training step (forward and
/// backward): 6 per matrix-multiply weight (the input embedding is a lookup,
/// GPT-2's tied `wte` is also its output projection) and 12·seq·hidden per
/// layer for the attention products (computed over the full square, as both
/// fdpo and PyTorch do). `scripts/bench_train.py` uses the same count.
fn flops_per_token(a: &TrainBenchArgs, params: usize) -> f64 {
    let embedding = match a.arch {
        Arch::Llama => a.vocab * a.hidden,
        // Tied: the embedding is also the output projection (a product).
        Arch::Qwen2 => 0,
        Arch::Gpt2 => a.seq.max(2) * a.hidden,
    };
    6.0 * (params - embedding) as f64 + 12.0 * (a.layers * a.seq * a.hidden) as f64
}

/// Sets the thread count of candle's kernels and gemm (the rayon pool).
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle's CPU kernels and gemm read the rayon pool size.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().ok();
    }
    Ok(())
}

/// The best of `steps` timings of an M×K by K×N f32 product through candle
/// (the `gemm` crate): 2MKN floating-point operations each.
fn run_gemm(a: GemmBenchArgs) -> Result<()> {
    set_threads(a.threads)?;
    let (m, k, n) = a.shape.unwrap_or((a.size, a.size, a.size));
    let x = Tensor::rand(-1f32, 1f32, (m, k), &Device::Cpu)?;
    let y = Tensor::rand(-1f32, 1f32, (k, n), &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for s in 0..a.steps + 1 {
        let t0 = Instant::now();
        let z = x.matmul(&y)?;
        let _ = z.get(0)?.get(0)?.to_scalar::<f32>()?;
        if s > 0 {
            best = best.min(t0.elapsed().as_secs_f64());
        }
    }
    let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
    let threads = threads(a.threads);
    if a.json {
        let mut record = json!({"benchmark": "gemm", "m": m, "k": k, "n": n, "threads": threads, "seconds": best, "gflops": gflops});
        if a.shape.is_none() {
            record["size"] = json!(n);
        }
        println!("{record}");
    } else {
        println!("f32 gemm {m}x{k}x{n}, {threads} threads: {:.1} ms, {gflops:.1} GFLOP/s", 1e3 * best);
    }
    Ok(())
}

/// Refuses sizes no model can have, naming the flag (each is already ≥ 1).
fn check_sizes(a: &TrainBenchArgs) -> Result<()> {
    if a.seq < 2 {
        bail!("--seq must be at least 2 (a step predicts token t+1 from token t), got {}", a.seq);
    }
    if !a.hidden.is_multiple_of(a.heads) {
        bail!("--hidden ({}) must be a multiple of --heads ({})", a.hidden, a.heads);
    }
    if let Some(kv) = a.kv_heads.filter(|&kv| !a.heads.is_multiple_of(kv)) {
        bail!("--heads ({}) must be a multiple of --kv-heads ({kv})", a.heads);
    }
    if !matches!(a.arch, Arch::Gpt2) && !(a.hidden / a.heads).is_multiple_of(2) {
        bail!(
            "--hidden / --heads ({} / {} = {}) must be even: RoPE rotates pairs of dimensions",
            a.hidden,
            a.heads,
            a.hidden / a.heads
        );
    }
    Ok(())
}

/// Sets the thread count and builds a freshly initialised model.
fn setup(a: &TrainBenchArgs) -> Result<(CausalLm, Weights)> {
    check_sizes(a)?;
    set_threads(a.threads)?;
    let device = Device::Cpu;
    let qwen2 = matches!(a.arch, Arch::Qwen2);
    let config = match a.arch {
        Arch::Llama | Arch::Qwen2 => ModelConfig::Llama(LlamaConfig {
            model_type: if qwen2 { "qwen2" } else { "llama" }.into(),
            vocab_size: a.vocab,
            hidden_size: a.hidden,
            intermediate_size: a.intermediate,
            num_hidden_layers: a.layers,
            num_attention_heads: a.heads,
            num_key_value_heads: a.kv_heads.unwrap_or(a.heads),
            head_dim: a.hidden / a.heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: a.seq.max(2),
            tie_word_embeddings: qwen2,
            qkv_bias: qwen2,
            o_bias: false,
            mlp_bias: false,
        }),
        Arch::Gpt2 => ModelConfig::Gpt2(Gpt2Config {
            vocab_size: a.vocab,
            n_positions: a.seq.max(2),
            n_embd: a.hidden,
            n_layer: a.layers,
            n_head: a.heads,
            n_inner: a.intermediate,
            layer_norm_epsilon: 1e-5,
        }),
    };
    let mut weights = Weights::random(0.02, DType::F32, &device);
    let model = CausalLm::build(&config, &mut weights)?;
    Ok((model, weights))
}

/// Mean seconds per step of forward (to the loss), backward and AdamW over
/// `steps` steps, after two untimed warm-up steps.
struct StepTimes {
    forward: f64,
    backward: f64,
    optimizer: f64,
}

impl StepTimes {
    fn measure(
        steps: usize,
        opt: &mut fdpo_train::optim::AdamW,
        mut loss: impl FnMut() -> Result<Tensor>,
    ) -> Result<StepTimes> {
        let mut t = StepTimes { forward: 0.0, backward: 0.0, optimizer: 0.0 };
        for s in 0..steps + 2 {
            let t0 = Instant::now();
            let loss = loss()?;
            let _ = loss.to_vec0::<f32>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads, 1e-4)?;
            let t3 = Instant::now();
            if s >= 2 {
                t.forward += (t1 - t0).as_secs_f64();
                t.backward += (t2 - t1).as_secs_f64();
                t.optimizer += (t3 - t2).as_secs_f64();
            }
        }
        let n = steps as f64;
        Ok(StepTimes { forward: t.forward / n, backward: t.backward / n, optimizer: t.optimizer / n })
    }

    /// Seconds per whole step.
    fn step(&self) -> f64 {
        self.forward + self.backward + self.optimizer
    }

    /// The fields both step benchmarks report, for `tokens` tokens per step.
    fn report(&self, a: &TrainBenchArgs, params: usize, tokens: f64) -> serde_json::Value {
        json!({
            "implementation": "fdpo (candle)",
            "arch": format!("{:?}", a.arch).to_lowercase(),
            "params": params,
            "threads": threads(a.threads),
            "seq": a.seq,
            "forward_ms": 1e3 * self.forward,
            "backward_ms": 1e3 * self.backward,
            "optimizer_ms": 1e3 * self.optimizer,
            "step_ms": 1e3 * self.step(),
            "tokens_per_s": tokens / self.step(),
            "gflops_per_s": flops_per_token(a, params) * tokens / self.step() / 1e9,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    }

    /// The human-readable line's timing part.
    fn describe(&self, tokens: f64, a: &TrainBenchArgs, params: usize) -> String {
        format!(
            "step {:.1} ms (fwd {:.1}, bwd {:.1}, AdamW {:.1}), {:.0} tokens/s ({:.1} GFLOP/s)",
            1e3 * self.step(),
            1e3 * self.forward,
            1e3 * self.backward,
            1e3 * self.optimizer,
            tokens / self.step(),
            flops_per_token(a, params) * tokens / self.step() / 1e9,
        )
    }
}

/// The thread count a run uses: `--threads`, or all cores.
fn threads(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn run_train(a: TrainBenchArgs) -> Result<()> {
    use fdpo_train::optim::{AdamW, AdamWConfig};
    let device = Device::Cpu;
    let (model, weights) = setup(&a)?;
    let params: usize = weights.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(weights.vars(), AdamWConfig { weight_decay: 0.01, ..Default::default() })?;
    let ids = Tensor::rand(0f32, a.vocab as f32, (a.batch, a.seq), &device)?.to_dtype(DType::U32)?;
    let inputs = ids.narrow(1, 0, a.seq - 1)?;
    let targets = ids.narrow(1, 1, a.seq - 1)?.contiguous()?;
    let times = StepTimes::measure(a.steps, &mut opt, || {
        let logits = model.forward(&inputs, None, None)?;
        // Mean next-token cross-entropy, as `fdpo sft` computes it.
        Ok(fdpo_model::fused::target_logprobs(&logits, &targets)?.mean_all()?.neg()?)
    })?;
    let tokens = (a.batch * (a.seq - 1)) as f64;
    // Forward only, without the graph being kept.
    let t0 = Instant::now();
    for _ in 0..a.steps {
        let logits = model.forward(&inputs, None, None)?.detach();
        let _ = logits.max(D::Minus1)?.sum_all()?.to_vec0::<f32>()?;
    }
    let forward_only = t0.elapsed().as_secs_f64() / a.steps as f64;
    let mut report = times.report(&a, params, tokens);
    report["batch"] = json!(a.batch);
    report["forward_tokens_per_s"] = json!(tokens / forward_only);
    if a.json {
        println!("{report}");
    } else {
        println!(
            "fdpo {:?}, {:.1}M params, batch {}x{}: {} train, {:.0} tokens/s forward, peak RSS {:.0} MiB",
            a.arch,
            params as f64 / 1e6,
            a.batch,
            a.seq,
            times.describe(tokens, &a, params),
            tokens / forward_only,
            peak_rss_bytes() as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// The f-DPO step of `fdpo train`: `--batch` pairs per step, reference
/// log-probs cached, sigmoid loss under reverse KL, AdamW. With `--lengths
/// uniform` every prompt and response has `--seq`/2 tokens and every step
/// the same pairs; with a profile, each step takes the next `--batch` pairs
/// drawn from it. Tokens/s counts what a padded step computes besides its
/// padding, Σ (P + C) + (P + R) per pair, whatever the layout, so layouts
/// and TRL compare on one scale.
fn run_dpo(d: DpoBenchArgs) -> Result<()> {
    use fdpo_train::data::PreferencePair;
    use fdpo_train::dpo::policy_logps;
    use fdpo_train::loss::{dpo_loss, LossConfig};
    use fdpo_train::optim::{AdamW, AdamWConfig};
    use rand::{Rng, SeedableRng};

    let a = &d.model;
    if a.seq < 4 {
        bail!("--seq must be at least 4");
    }
    let device = Device::Cpu;
    let (model, weights) = setup(a)?;
    let params: usize = weights.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(weights.vars(), AdamWConfig { weight_decay: 0.01, ..Default::default() })?;
    let uniform = d.lengths == LengthProfile::Uniform;
    let batches = if uniform { 1 } else { a.steps + 2 };
    let lengths = d.lengths.draw(a.batch * batches, a.seq, 0);
    if let Some(path) = &d.write_lengths {
        fdpo_core::write_atomic(path, serde_json::to_string(&lengths)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..a.vocab as u32)).collect() };
    let pairs: Vec<PreferencePair> = lengths
        .iter()
        .enumerate()
        .map(|(i, &[p, c, r])| PreferencePair {
            id: i.to_string(),
            prompt: draw(p),
            chosen: draw(c),
            rejected: draw(r),
        })
        .collect();
    let steps: Vec<Vec<&PreferencePair>> = pairs.chunks(a.batch).map(|c| c.iter().collect()).collect();
    let loss_cfg = LossConfig {
        divergence: fdpo_core::Divergence::ReverseKl,
        loss_type: fdpo_core::loss::LossType::Sigmoid,
        beta: 0.1,
        label_smoothing: 0.0,
        reference_free: false,
    };
    let batching = d.layout.batching();
    // The cached reference: the initial policy's log-probs.
    let reference = steps
        .iter()
        .map(|refs| {
            let r = policy_logps(&model, refs, 0, batching, &device)?;
            Ok((r.chosen.detach(), r.rejected.detach()))
        })
        .collect::<Result<Vec<_>>>()?;
    let tokens_of = |refs: &[&PreferencePair]| -> usize {
        refs.iter().map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len()).sum()
    };
    let mut step = 0;
    let times = StepTimes::measure(a.steps, &mut opt, || {
        let k = step % steps.len();
        step += 1;
        let policy = policy_logps(&model, &steps[k], 0, batching, &device)?;
        let (rc, rr) = &reference[k];
        Ok(dpo_loss(&loss_cfg, &policy.chosen, &policy.rejected, rc, rr)?.loss)
    })?;
    // Tokens per timed step (steps 2.. of the cycle), averaged.
    let timed: usize = (2..a.steps + 2).map(|s| tokens_of(&steps[s % steps.len()])).sum();
    let tokens = timed as f64 / a.steps as f64;
    let mut report = times.report(a, params, tokens);
    report["benchmark"] = json!("dpo");
    report["pairs"] = json!(a.batch);
    report["lengths"] = json!(format!("{:?}", d.lengths).to_lowercase());
    report["layout"] = json!(format!("{:?}", d.layout).to_lowercase());
    report["tokens_per_step"] = json!(tokens);
    if !uniform {
        // The FLOP count assumes --seq-token sequences.
        report.as_object_mut().expect("an object").remove("gflops_per_s");
    }
    if a.json {
        println!("{report}");
    } else {
        println!(
            "fdpo f-DPO step, {:?}, {:.1}M params, {} pairs, {:?} lengths ({:.0} tokens a step), {:?}: step {:.1} ms (fwd {:.1}, bwd {:.1}, AdamW {:.1}), {:.0} tokens/s, peak RSS {:.0} MiB",
            a.arch,
            params as f64 / 1e6,
            a.batch,
            d.lengths,
            tokens,
            d.layout,
            1e3 * times.step(),
            1e3 * times.forward,
            1e3 * times.backward,
            1e3 * times.optimizer,
            tokens / times.step(),
            peak_rss_bytes() as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// Sampling throughput: `--batch` random prompts of `--seq`/2 tokens, each
/// continued by exactly `--seq`/2 sampled tokens (no EOS) with the KV cache.
/// `scripts/bench_generate.py` does the same with transformers' `generate`.
fn run_generate(a: TrainBenchArgs) -> Result<()> {
    use fdpo_model::sample::{generate_batch, SamplingConfig};
    use rand::{Rng, SeedableRng};
    let device = Device::Cpu;
    let (model, _) = setup(&a)?;
    let (p_len, new) = (a.seq / 2, a.seq - a.seq / 2);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> =
        (0..a.batch).map(|_| (0..p_len).map(|_| rng.random_range(0..a.vocab as u32)).collect()).collect();
    let cfg = SamplingConfig { max_new_tokens: new, temperature: 1.0, top_k: None, top_p: None, seed: 0 };
    generate_batch(&model, &prompts, 0, 1, &[], &cfg, &device)?; // warm-up
    let t0 = Instant::now();
    let mut generated = 0;
    for _ in 0..a.steps {
        let out = generate_batch(&model, &prompts, 0, 1, &[], &cfg, &device)?;
        generated += out.iter().flatten().map(Vec::len).sum::<usize>();
    }
    let seconds = t0.elapsed().as_secs_f64();
    let report = json!({
        "implementation": "fdpo (candle)",
        "benchmark": "generate",
        "batch": a.batch,
        "prompt_tokens": p_len,
        "new_tokens": new,
        "tokens_per_s": generated as f64 / seconds,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "fdpo generate, {} prompts x {p_len} tokens + {new} new: {:.0} tokens/s, peak RSS {:.0} MiB",
            a.batch,
            generated as f64 / seconds,
            peak_rss_bytes() as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each profile's draws have the prompt:completion ratio (of means) and
    /// median total it names, every sequence within --seq, every part at
    /// least 2 tokens, chosen and rejected drawn apart; uniform is --seq/2 each.
    #[test]
    fn length_profiles_have_their_published_shape() {
        let stats = |x: &mut Vec<f64>| {
            x.sort_by(f64::total_cmp);
            (x.iter().sum::<f64>() / x.len() as f64, x[x.len() / 2])
        };
        for (profile, ratio, median_total) in [
            (LengthProfile::Hh, 2.15, 186.0),
            (LengthProfile::Ultrafeedback, 0.42, 429.0),
            (LengthProfile::Capybara, 1.59, 391.0),
            (LengthProfile::Tldr, 11.1, 416.0),
        ] {
            let pairs = profile.draw(20_000, 4096, 7);
            assert!(pairs.iter().all(|&[p, c, r]| p >= 2 && c >= 2 && r >= 2 && p + c.max(r) <= 4096));
            assert!(
                pairs.iter().filter(|[_, c, r]| c != r).count() > 15_000,
                "{profile:?}: chosen = rejected"
            );
            let (mut prompts, mut responses, mut totals) = (vec![], vec![], vec![]);
            for &[p, c, _] in &pairs {
                prompts.push(p as f64);
                responses.push(c as f64);
                totals.push((p + c) as f64);
            }
            let ((mp, _), (mr, _), (_, mt)) =
                (stats(&mut prompts), stats(&mut responses), stats(&mut totals));
            assert!((mp / mr / ratio - 1.0).abs() < 0.05, "{profile:?}: ratio {}", mp / mr);
            assert!((mt / median_total - 1.0).abs() < 0.1, "{profile:?}: median total {mt}");
        }
        // The cap cuts responses first; uniform is --seq/2 + --seq/2.
        let capped = LengthProfile::Tldr.draw(2_000, 300, 1);
        assert!(capped.iter().all(|&[p, c, r]| p + c <= 300 && p + r <= 300));
        assert!(capped.iter().any(|&[p, c, _]| p + c == 300));
        assert_eq!(LengthProfile::Uniform.draw(3, 129, 0), vec![[64, 65, 65]; 3]);
    }
}
