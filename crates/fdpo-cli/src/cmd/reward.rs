//! `fdpo reward train` (a Bradley–Terry reward model on preference pairs,
//! the trainer's options) and `fdpo reward score` (adds a `scores` list,
//! one per response, to each line of a samples file).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Subcommand};
use fdpo_model::reward::RewardModel;
use fdpo_model::TextTokenizer;
use serde_json::Value;

use fdpo_data::records::{read_rows, SamplesRecord};
use fdpo_data::{tokenize, DataError, Text};

use super::train::TrainArgs;
use crate::output::{progress, write_file};

/// Reward-model commands.
#[derive(Debug, Subcommand)]
pub enum RewardCommand {
    /// Train a reward model on preference pairs (options as `fdpo train`).
    Train(Box<TrainArgs<fdpo_train::config::RewardKeys>>),
    /// Score every response of a samples file.
    Score(ScoreArgs),
}

impl RewardCommand {
    /// Runs the command.
    pub fn run(self) -> Result<()> {
        match self {
            RewardCommand::Train(a) => super::train::run(*a),
            RewardCommand::Score(a) => score(a),
        }
    }
}

/// Arguments of `fdpo reward score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// A reward model directory (sequence-classification layout, one label).
    #[arg(long, required_unless_present = "demo_reward", conflicts_with = "demo_reward")]
    pub model: Option<PathBuf>,
    /// Score with the built-in demo task's true reward (the sentiment of the review) instead.
    #[arg(long)]
    pub demo_reward: bool,
    /// Samples: `{"prompt", "responses": [...]}` records (.jsonl, .parquet or a dataset folder).
    pub samples: PathBuf,
    /// Output JSONL (default: `<samples>.scored.jsonl`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Responses scored per batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
}

fn score(a: ScoreArgs) -> Result<()> {
    let device = fdpo_model::device(&a.device)?;
    let Some(dir) = &a.model else { return score_demo(&a) };
    let tokenizer = TextTokenizer::load(dir)?;
    let (model, _) = RewardModel::load(dir, tokenizer.pad_id(), DType::F32, &device)
        .with_context(|| format!("loading {}", dir.display()))?;
    let rows = read_rows(&a.samples, "train")?;
    let bar = progress(rows.len(), "scoring");
    let mut out = String::new();
    for row in rows {
        let at = &row.at;
        let record = row.parse::<SamplesRecord>()?;
        let mut seqs = Vec::with_capacity(record.responses.len());
        for (k, r) in record.responses.iter().enumerate() {
            let field = format!("responses[{k}]");
            let t = tokenize(&tokenizer, &record.prompt, &Text::Plain(r.clone()), &field, true)
                .map_err(DataError::tokenize(at))?;
            if t.prompt.len() + t.response.len() > model.max_positions() {
                bail!(
                    "{at}: {field}: prompt and response are {} tokens, beyond the reward model's {} positions (config.json)",
                    t.prompt.len() + t.response.len(),
                    model.max_positions()
                );
            }
            seqs.push((t.prompt, t.response));
        }
        let mut scores = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(a.batch_size.max(1)) {
            scores.extend(model.score(chunk, &device)?);
        }
        let mut obj = row.fields;
        obj.insert("scores".into(), scores.into());
        out.push_str(&Value::Object(obj).to_string());
        out.push('\n');
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_scored(&a, &out)
}

fn write_scored(a: &ScoreArgs, text: &str) -> Result<()> {
    let path = a.out.clone().unwrap_or_else(|| a.samples.with_extension("scored.jsonl"));
    write_file(&path, text.as_bytes())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Scores with the demo task's programmatic reward (no model).
fn score_demo(a: &ScoreArgs) -> Result<()> {
    let mut out = String::new();
    for row in read_rows(&a.samples, "train")? {
        let record = row.parse::<SamplesRecord>()?;
        let scores: Vec<f64> =
            record.responses.iter().map(|r| fdpo_train::task::ReviewTask::reward(r)).collect();
        let mut obj = row.fields;
        obj.insert("scores".into(), scores.into());
        out.push_str(&Value::Object(obj).to_string());
        out.push('\n');
    }
    write_scored(a, &out)
}
