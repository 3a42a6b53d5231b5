//! `fdpo generate`: K sampled responses per prompt, written as
//! `{"prompt", "responses": [...]}` JSONL (the input of `fdpo eval`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use fdpo_model::sample::{generate, SamplingConfig};
use serde_json::json;

use super::model_args::{prompt_ids, read_jsonl, text_field, ModelArgs};
use crate::output::{progress, write_file};

/// Arguments of `fdpo generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL with a `prompt` per line (a string, or a list of messages rendered with the chat
    /// template and a generation prompt).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Responses per prompt.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// Tokens to generate at most per response.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the most likely tokens up to this probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the sampler (prompt i uses seed + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output JSONL.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `fdpo generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let valid_top_p = |p: f64| p > 0.0 && p <= 1.0;
    if args.temperature.is_nan() || args.temperature < 0.0 || args.top_p.is_some_and(|p| !valid_top_p(p)) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let loaded = args.model.load()?;
    let records = read_jsonl(&args.prompts)?;
    let bar = progress(records.len(), "generate");
    let mut text = String::new();
    for (i, (line, obj)) in records.iter().enumerate() {
        let at = format!("{}:{line}", args.prompts.display());
        let (prompt, templated) = text_field(obj, "prompt", &at, &loaded.tokenizer, true)?
            .ok_or_else(|| anyhow::anyhow!("{at}: missing field `prompt`"))?;
        let ids = prompt_ids(&loaded.tokenizer, &prompt, templated)?;
        let room = loaded.model.max_positions().saturating_sub(ids.len());
        if room == 0 {
            bail!(
                "{at}: field `prompt`: {} tokens leave no room in the model's {} positions",
                ids.len(),
                loaded.model.max_positions()
            );
        }
        let cfg = SamplingConfig {
            max_new_tokens: args.max_new_tokens.min(room),
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed.wrapping_add(i as u64),
        };
        let samples =
            generate(&loaded.model, &ids, args.samples, loaded.tokenizer.eos_id(), &cfg, &loaded.device)?;
        let responses: Vec<String> =
            samples.iter().map(|s| loaded.tokenizer.decode(s, true)).collect::<Result<_, _>>()?;
        text.push_str(&serde_json::to_string(&json!({"prompt": obj["prompt"], "responses": responses}))?);
        text.push('\n');
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_file(&args.out, text.as_bytes())?;
    eprintln!("wrote {} ({} prompts x {} samples)", args.out.display(), records.len(), args.samples);
    Ok(())
}
