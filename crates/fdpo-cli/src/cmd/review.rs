//! The review task's laboratory, shared by `fdpo demo` and `fdpo sweep`:
//! the task's options, the run folder's claim, the reference model (trained
//! with `fdpo sft`'s machinery on a seeded corpus, cached), Bradley–Terry
//! preference pairs on the true reward, one f-DPO run, and the grammar's
//! enumerated responses, over which any policy is evaluated exactly and the
//! exact optimum π* is computed (fdpo_train::task holds the task itself).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use fdpo_core::{normalise_ref_logprobs, Divergence, Instance, Prompt};
use fdpo_model::logprobs::sequence_logprobs;
use fdpo_model::sample::{generate_batch, SamplingConfig};
use fdpo_model::save::save_pretrained;
use fdpo_model::{CausalLm, ModelConfig, TextTokenizer, Weights};
use fdpo_train::config::{parse_config, CommonKeys, DpoFile, DpoKeys, SftKeys};
use fdpo_train::dpo::train_dpo;
use fdpo_train::sft::train_sft;
use fdpo_train::task::{seeded_init, ReviewTask, GENRES};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::train::Progress;
use crate::output::write_file;

/// The review task's sizes and the f-DPO settings every run shares.
#[derive(Debug, Clone, Args)]
pub struct TaskArgs {
    /// Seed of the grammar, the reference, the pairs and the samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// SFT corpus size (reviews).
    #[arg(long, default_value_t = 20000, value_parser = crate::cmd::parse::at_least_one)]
    pub corpus: usize,
    /// SFT steps of the reference (batch 64).
    #[arg(long, default_value_t = 800, value_parser = crate::cmd::parse::at_least_one)]
    pub sft_steps: usize,
    /// Hidden size of the reference model (2 layers, 4 heads): a multiple of 8.
    #[arg(long, default_value_t = 64, value_parser = crate::cmd::parse::at_least_one)]
    pub hidden: usize,
    /// Preference pairs per prompt (8 prompts).
    #[arg(long, default_value_t = 128, value_parser = crate::cmd::parse::at_least_one)]
    pub pairs_per_prompt: usize,
    /// f-DPO epochs over the pairs.
    #[arg(long, default_value_t = 3.0, value_parser = crate::cmd::parse::positive)]
    pub num_train_epochs: f64,
    /// f-DPO learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = crate::cmd::parse::positive)]
    pub learning_rate: f64,
}

impl TaskArgs {
    /// Refuses sizes the task cannot run with, naming the flag.
    pub fn check(&self) -> Result<()> {
        if !self.hidden.is_multiple_of(8) {
            bail!(
                "--hidden must be a multiple of 8 (4 heads of an even size, for RoPE), got {}",
                self.hidden
            );
        }
        Ok(())
    }

    /// The settings as JSON (for a run's marker file and summary).
    pub fn settings(&self) -> Value {
        json!({
            "seed": self.seed, "corpus": self.corpus, "sft_steps": self.sft_steps, "hidden": self.hidden,
            "pairs_per_prompt": self.pairs_per_prompt, "num_train_epochs": self.num_train_epochs,
            "learning_rate": self.learning_rate,
        })
    }
}

/// The divergences `fdpo demo` and `fdpo sweep` train by default.
pub const DIVERGENCES: &str = "reverse-kl,js,alpha:0.3,alpha:0.5,alpha:0.7,forward-kl,chi-po";

/// Refuses an empty divergence list or one that names a divergence twice,
/// naming the flag.
pub fn check_divergences(flag: &str, list: &[Divergence]) -> Result<()> {
    if list.is_empty() {
        bail!("{flag}: give at least one");
    }
    for (i, d) in list.iter().enumerate() {
        if list[..i].contains(d) {
            bail!("{flag}: {} is listed twice", d.name());
        }
    }
    Ok(())
}

/// Whether `path` holds JSON for which `test` holds.
pub fn json_file_where(path: &Path, test: impl Fn(&Value) -> bool) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| test(&v))
}

/// Claims `out` for a command that replaces its own subfolders on a rerun:
/// refuses a folder that holds anything else (`ours` says whether a
/// non-empty folder was written by this command), removes the `stale`
/// subfolders of an earlier call, and writes the marker `marker` with
/// `settings`. A user's files are never deleted.
pub fn claim_output_dir(
    out: &Path,
    command: &str,
    marker: &str,
    settings: &Value,
    ours: impl Fn(&Path) -> bool,
    stale: &[&str],
) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--output-dir {} is not a folder", out.display());
    }
    let empty = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e).with_context(|| format!("reading --output-dir {}", out.display())),
    };
    if !empty && !ours(out) {
        bail!(
            "--output-dir {} holds files that {command} did not write (no {marker}); nothing was changed — \
             choose a new or empty folder",
            out.display()
        );
    }
    for name in stale {
        let dir = out.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    write_file(&out.join(marker), serde_json::to_string_pretty(settings)?.as_bytes())
}

/// The task name in the cached reference's key (reference/reference.json).
pub const REFERENCE_TASK: &str = "reviews-v1";

/// Sizes the cached reference depends on.
fn reference_key(t: &TaskArgs) -> Value {
    json!({"task": REFERENCE_TASK, "seed": t.seed, "corpus": t.corpus, "sft_steps": t.sft_steps, "hidden": t.hidden})
}

/// Whether `path` holds exactly the JSON `key`.
fn cached(path: &Path, key: &Value) -> bool {
    json_file_where(path, |v| v == key)
}

/// The reference model, trained with `fdpo sft`'s machinery, in `dir`;
/// reused when `dir` holds one of the same sizes, unless `fresh`.
pub fn build_reference(t: &TaskArgs, fresh: bool, dir: &Path, device: &Device) -> Result<PathBuf> {
    let task = ReviewTask::new(t.seed);
    let model_dir = dir.join("sft/final");
    let key_path = dir.join("reference.json");
    let key = reference_key(t);
    if !fresh && cached(&key_path, &key) && model_dir.join("model.safetensors").exists() {
        eprintln!("reference: reusing {}", model_dir.display());
        return Ok(model_dir);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let init = dir.join("init");
    ReviewTask::write_model_files(&init, t.hidden, 2, 4)
        .with_context(|| format!("writing {}", init.display()))?;
    let config = ModelConfig::read(&init.join("config.json"))?;
    let mut weights = Weights::random(0.02, DType::F32, device);
    CausalLm::build(&config, &mut weights)?;
    seeded_init(&weights, t.seed)?;
    save_pretrained(&weights, &init, &init)?;
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0xc0_95);
    let prompts = task.prompts();
    let mut corpus = String::new();
    for i in 0..t.corpus {
        let g = i % GENRES.len();
        let text = ReviewTask::text(&task.sample(g, &mut rng));
        corpus.push_str(&json!({"prompt": prompts[g], "completion": format!(" {text}")}).to_string());
        corpus.push('\n');
    }
    let corpus_path = dir.join("corpus.jsonl");
    write_file(&corpus_path, corpus.as_bytes())?;
    let text = format!(
        "model = {init:?}\ntrain_file = {corpus_path:?}\noutput_dir = {:?}\nlearning_rate = 1e-2\n\
         per_device_train_batch_size = 64\nmax_steps = {}\nwarmup_ratio = 0.05\nlr_scheduler_type = \"cosine\"\n\
         max_length = 32\nlogging_steps = 50\nsave_steps = 100000\nseed = {}\n\
         overwrite_output_dir = true\n",
        dir.join("sft"),
        t.sft_steps,
        t.seed
    );
    let path = dir.join("sft.toml");
    write_file(&path, text.as_bytes())?;
    let config = parse_config::<SftKeys>(&text, &path)?;
    train_sft(&config, device, false, &mut Progress::new("reference (SFT)"), None)?;
    write_file(&key_path, key.to_string().as_bytes())?;
    Ok(model_dir)
}

/// A preference record of `y1` and `y2` for `prompt`, labelled by
/// Bradley–Terry on the true reward: `y1` is chosen with probability
/// σ(r(y1) − r(y2)).
fn bradley_terry_pair(prompt: &str, y1: &str, y2: &str, rng: &mut impl Rng) -> String {
    let (r1, r2) = (ReviewTask::reward(y1), ReviewTask::reward(y2));
    let first_wins = rng.random::<f64>() < 1.0 / (1.0 + (r2 - r1).exp());
    let (c, r) = if first_wins { (y1, y2) } else { (y2, y1) };
    json!({"prompt": prompt, "chosen": format!(" {c}"), "rejected": format!(" {r}")}).to_string()
}

/// `dir/prefs.jsonl`: `pairs_per_prompt` pairs of two samples of the
/// reference model per prompt, Bradley–Terry labels (reused when cached).
pub fn build_pairs(t: &TaskArgs, fresh: bool, reference: &TaskModel, dir: &Path) -> Result<PathBuf> {
    let path = dir.join("prefs.jsonl");
    let key_path = dir.join("prefs.json");
    let key = json!({"reference": reference_key(t), "pairs_per_prompt": t.pairs_per_prompt});
    if !fresh && cached(&key_path, &key) && path.exists() {
        return Ok(path);
    }
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed: t.seed ^ 0xba1,
    };
    let samples = reference.sample(&cfg, 2 * t.pairs_per_prompt)?;
    let mut rng = ChaCha8Rng::seed_from_u64(t.seed ^ 0xb7);
    let mut out = String::new();
    let prompts = ReviewTask::new(t.seed).prompts();
    for (g, texts) in samples.iter().enumerate() {
        for pair in texts.chunks(2) {
            out.push_str(&bradley_terry_pair(&prompts[g], &pair[0], &pair[1], &mut rng));
            out.push('\n');
        }
    }
    write_file(&path, out.as_bytes())?;
    write_file(&key_path, key.to_string().as_bytes())?;
    Ok(path)
}

/// A model of the task with its tokenizer and the task's prompts tokenised.
pub struct TaskModel {
    model: CausalLm,
    tokenizer: TextTokenizer,
    prompts: Vec<Vec<u32>>,
    eos: u32,
    device: Device,
}

impl TaskModel {
    /// Loads the model directory `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let (model, _) = CausalLm::load(dir, DType::F32, device)?;
        let tokenizer = TextTokenizer::load(dir)?;
        let prompts = ReviewTask::new(0)
            .prompts()
            .iter()
            .map(|p| tokenizer.encode(p, true))
            .collect::<Result<Vec<_>, _>>()?;
        let eos = tokenizer.eos_id().context("the task tokenizer has an EOS")?;
        Ok(TaskModel { model, tokenizer, prompts, eos, device: device.clone() })
    }

    /// `k` sampled texts per prompt.
    pub fn sample(&self, cfg: &SamplingConfig, k: usize) -> Result<Vec<Vec<String>>> {
        let ids = generate_batch(&self.model, &self.prompts, 0, k, &[self.eos], cfg, &self.device)?;
        ids.iter()
            .map(|per| per.iter().map(|r| Ok(self.tokenizer.decode(r, true)?)).collect::<Result<Vec<_>>>())
            .collect()
    }

    fn response_ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, false)?;
        ids.push(self.eos);
        Ok(ids)
    }

    /// Σ log π(y | prompt) (with EOS) and mean token entropy of each text of each prompt.
    pub fn logprobs(&self, texts: &[Vec<String>]) -> Result<Vec<Vec<(f64, f64)>>> {
        let mut out = Vec::with_capacity(texts.len());
        for (g, per) in texts.iter().enumerate() {
            let mut row = Vec::with_capacity(per.len());
            let seqs: Vec<(Vec<u32>, Vec<u32>)> = per
                .iter()
                .map(|t| Ok((self.prompts[g].clone(), self.response_ids(t)?)))
                .collect::<Result<_>>()?;
            for chunk in seqs.chunks(1024) {
                let scores = sequence_logprobs(&self.model, chunk, 0, &self.device)?;
                row.extend(scores.iter().map(|s| (s.logprob_sum, s.entropy_mean)));
            }
            out.push(row);
        }
        Ok(out)
    }

    /// The tokenizer's ids of a text (no special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.tokenizer.encode(text, false)?)
    }
}

/// The grammar's responses, their true rewards, and the reference's
/// log-probabilities of each, per prompt: the finite problem on which π*
/// is exact and any policy is evaluated exactly.
pub struct Grammar {
    /// Every response of the grammar, in ReviewTask::enumerate's order.
    pub texts: Vec<String>,
    /// The true reward of each.
    pub rewards: Vec<f64>,
    /// log π_ref(y | prompt) per prompt (not renormalised over the grammar).
    pub ref_logps: Vec<Vec<f64>>,
}

impl Grammar {
    /// The grammar under `reference`.
    pub fn new(reference: &TaskModel) -> Result<Self> {
        let texts: Vec<String> = ReviewTask::enumerate().iter().map(ReviewTask::text).collect();
        let rewards = texts.iter().map(|t| ReviewTask::reward(t)).collect();
        let mut grammar = Grammar { texts, rewards, ref_logps: vec![] };
        grammar.ref_logps = grammar.logps(reference)?;
        Ok(grammar)
    }

    /// log π(y | prompt) of every response, per prompt.
    pub fn logps(&self, policy: &TaskModel) -> Result<Vec<Vec<f64>>> {
        let per_prompt = vec![self.texts.clone(); GENRES.len()];
        Ok(policy.logprobs(&per_prompt)?.into_iter().map(|r| r.into_iter().map(|x| x.0).collect()).collect())
    }

    /// The reference's mass on the grammar, per prompt.
    pub fn coverage(&self) -> Vec<f64> {
        self.ref_logps.iter().map(|l| l.iter().map(|x| x.exp()).sum()).collect()
    }

    /// The problem as an `fdpo exact` instance: one prompt per genre (its
    /// id the prompt's text), the reference renormalised over the grammar.
    pub fn instance(&self) -> Result<Instance> {
        let prompts = ReviewTask::new(0).prompts();
        let prompts = self
            .ref_logps
            .iter()
            .zip(prompts)
            .map(|(l, id)| {
                let (ref_logprobs, _) = normalise_ref_logprobs(l)?;
                Ok(Prompt { id, texts: self.texts.clone(), ref_logprobs, rewards: self.rewards.clone() })
            })
            .collect::<Result<Vec<_>, fdpo_core::SolveError>>()?;
        Ok(Instance { prompts })
    }

    /// `n` preference records per prompt (prompt-major): two responses
    /// drawn independently from π_ref renormalised over the grammar — the
    /// distribution the exact π* is defined against — labelled by
    /// Bradley–Terry on the true reward. Prompt g's stream is seeded by
    /// (seed, g), so a longer draw extends a shorter one.
    pub fn pairs(&self, n: usize, seed: u64) -> Result<Vec<Vec<String>>> {
        let prompts = ReviewTask::new(0).prompts();
        self.ref_logps
            .iter()
            .enumerate()
            .map(|(g, l)| {
                let (log_q, _) = normalise_ref_logprobs(l)?;
                let index = WeightedIndex::new(log_q.iter().map(|x| x.exp()))?;
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(g as u64);
                Ok((0..n)
                    .map(|_| {
                        let (i, j) = (index.sample(&mut rng), index.sample(&mut rng));
                        bradley_terry_pair(&prompts[g], &self.texts[i], &self.texts[j], &mut rng)
                    })
                    .collect())
            })
            .collect()
    }
}

/// How long an f-DPO run trains.
#[derive(Debug, Clone, Copy)]
pub enum RunLength {
    /// Epochs over the pairs; one checkpoint-free run.
    Epochs(f64),
    /// Optimiser steps, with a checkpoint every `save_every` steps.
    Steps {
        /// Optimiser steps.
        steps: usize,
        /// Checkpoint interval.
        save_every: usize,
    },
}

/// One f-DPO run on the task with the demo's batch and length settings.
#[derive(Debug, Clone)]
pub struct PolicyRun {
    /// The reference (and initial policy) model directory.
    pub reference: PathBuf,
    /// The preference pairs.
    pub train_file: PathBuf,
    /// The run folder.
    pub output_dir: PathBuf,
    /// The divergence.
    pub divergence: Divergence,
    /// β.
    pub beta: f64,
    /// The learning rate.
    pub learning_rate: f64,
    /// How long it trains.
    pub length: RunLength,
    /// The data-order seed.
    pub seed: u64,
}

/// A finished run: its `final/` model and the number of pairs it trained on.
pub struct Trained {
    /// `output_dir/final`.
    pub model_dir: PathBuf,
    /// Pairs read from the training file.
    pub pairs: usize,
}

impl PolicyRun {
    /// Trains with `fdpo train`'s machinery (batch 32, 10% warm-up, prompts
    /// ≤ 16 and sequences ≤ 32 tokens), quietly.
    pub fn train(&self, device: &Device) -> Result<Trained> {
        let (num_train_epochs, max_steps, save_steps) = match self.length {
            RunLength::Epochs(e) => (Some(e), None, 1_000_000),
            RunLength::Steps { steps, save_every } => (None, Some(steps), save_every),
        };
        let file = DpoFile {
            common: CommonKeys {
                model: Some(self.reference.clone()),
                train_file: Some(self.train_file.clone()),
                output_dir: Some(self.output_dir.clone()),
                learning_rate: Some(self.learning_rate),
                per_device_train_batch_size: Some(32),
                num_train_epochs,
                max_steps,
                max_length: Some(32),
                max_prompt_length: Some(16),
                warmup_ratio: Some(0.1),
                logging_steps: Some(10),
                save_steps: Some(save_steps),
                seed: Some(self.seed),
                overwrite_output_dir: Some(true),
                ..Default::default()
            },
            own: DpoKeys {
                beta: Some(self.beta),
                f_divergence_type: Some(self.divergence.name()),
                ..Default::default()
            },
        };
        let config = file.validate(&self.output_dir.join("(run settings)"))?;
        let summary = train_dpo(&config, device, false, &mut fdpo_train::trainer::Quiet, None)?;
        let fdpo_train::trainer::Outcome::Finished { model_dir } = summary.outcome else {
            bail!("the run in {} stopped early", self.output_dir.display())
        };
        Ok(Trained { model_dir, pairs: summary.train_data.pairs.len() })
    }
}
