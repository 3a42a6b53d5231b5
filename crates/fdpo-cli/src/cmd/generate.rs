//! `fdpo generate`: K sampled responses per prompt, written as
//! `{"prompt", "responses": [...]}` JSONL (the input of `fdpo eval`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use fdpo_data::records::{read_rows, PromptRecord};
use fdpo_data::tokenize_prompt;
use fdpo_model::sample::{generate_ensemble, SamplingConfig};
use fdpo_model::CausalLm;
use serde_json::json;

use super::model_args::ModelArgs;
use crate::output::{progress, write_file};

/// Arguments of `fdpo generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Records with a `prompt` (a string, or a list of messages rendered with the chat template
    /// and a generation prompt): a .jsonl, a .parquet or a dataset folder.
    #[arg(long)]
    pub prompts: PathBuf,
    /// The split of a dataset folder.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Responses per prompt.
    #[arg(long, default_value_t = 4, value_parser = crate::cmd::parse::at_least_one)]
    pub samples: usize,
    /// Tokens to generate at most per response.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature, finite and >= 0 (0 = greedy).
    #[arg(long, default_value_t = 1.0, value_parser = crate::cmd::parse::non_negative)]
    pub temperature: f64,
    /// Keep only the k most likely tokens; 0 keeps all (no top-k filtering, as transformers'
    /// top_k=0).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens up to this probability, in (0, 1].
    #[arg(long, value_parser = crate::cmd::parse::probability)]
    pub top_p: Option<f64>,
    /// Seed of the sampler; each (prompt, sample) has its own stream, so the
    /// output does not depend on --batch-size.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts per left-padded batch.
    #[arg(long, default_value_t = 8, value_parser = crate::cmd::parse::at_least_one)]
    pub batch_size: usize,
    /// Output JSONL.
    #[arg(long)]
    pub out: PathBuf,
    /// More models (comma-separated directories, same tokenizer): each token is drawn from the
    /// arithmetic mixture of --model and these models' next-token distributions.
    #[arg(long, value_delimiter = ',')]
    pub ensemble: Vec<PathBuf>,
    /// Mixture weights, one per model, --model first (default: equal).
    #[arg(long, value_delimiter = ',', requires = "ensemble")]
    pub weights: Vec<f64>,
}

/// Runs `fdpo generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let records = read_rows(&args.prompts, &args.split)?;
    if records.is_empty() {
        bail!("{}: no prompts", args.prompts.display());
    }
    let loaded = args.model.load()?;
    let members: Vec<CausalLm> = args
        .ensemble
        .iter()
        .map(|dir| Ok(CausalLm::load(dir, fdpo_model::dtype(&args.model.dtype)?, &loaded.device)?.0))
        .collect::<Result<_>>()?;
    let weights = if args.weights.is_empty() { vec![1.0; members.len() + 1] } else { args.weights.clone() };
    if weights.len() != members.len() + 1
        || weights.iter().any(|w| !w.is_finite() || *w < 0.0)
        || weights.iter().sum::<f64>() <= 0.0
    {
        bail!("--weights: give {} non-negative weights (--model first), not all 0", members.len() + 1);
    }
    let models: Vec<(&CausalLm, f64)> =
        std::iter::once(&loaded.model).chain(&members).zip(weights.iter().copied()).collect();
    let eos = fdpo_model::sample::eos_ids(&args.model.model, loaded.tokenizer.eos_id())?;
    let bar = progress(records.len(), "generate");
    let mut text = String::new();
    let mut prepared = Vec::with_capacity(records.len());
    for row in &records {
        let at = &row.at;
        let ids = tokenize_prompt(&loaded.tokenizer, &row.parse::<PromptRecord>()?.prompt)
            .map_err(|e| fdpo_data::DataError::tokenize(at)(e.into()))?;
        if ids.is_empty() || ids.len() >= loaded.model.max_positions() {
            bail!(
                "{at}: field `prompt`: {} tokens leave no room in the model's {} positions",
                ids.len(),
                loaded.model.max_positions()
            );
        }
        prepared.push(ids);
    }
    for (b, batch) in prepared.chunks(args.batch_size).enumerate() {
        let first = b * args.batch_size;
        let longest = batch.iter().map(Vec::len).max().unwrap_or(0);
        let cfg = SamplingConfig {
            max_new_tokens: args.max_new_tokens.min(loaded.model.max_positions() - longest),
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        };
        let samples = generate_ensemble(&models, batch, first, args.samples, &eos, &cfg, &loaded.device)?;
        for (k, per_prompt) in samples.iter().enumerate() {
            let responses: Vec<String> =
                per_prompt.iter().map(|s| loaded.tokenizer.decode(s, true)).collect::<Result<_, _>>()?;
            let prompt = &records[first + k].fields["prompt"];
            text.push_str(&serde_json::to_string(&json!({"prompt": prompt, "responses": responses}))?);
            text.push('\n');
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    write_file(&args.out, text.as_bytes())?;
    eprintln!("wrote {} ({} prompts x {} samples)", args.out.display(), records.len(), args.samples);
    Ok(())
}
