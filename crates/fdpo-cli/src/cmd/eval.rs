//! `fdpo eval diversity`: per-input and across-input diversity of one or
//! more samples files side by side (Kirk et al. 2023, Figure 5), with the
//! model-free metrics: distinct-1..4, EAD (n = 1..5), 1 − self-BLEU.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use fdpo_eval::report::{
    diversity, embedding_diversity, nli_diversity, policy_entropy, tokenize, undefined_when, MetricSummary,
    WordIds, METRICS,
};
use fdpo_eval::samples::read_samples;
use fdpo_model::TextTokenizer;
use serde_json::json;

use crate::output::{fmt_num, write_file, Table};
use crate::plot::{self, BarPanel};

/// Evaluations.
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Diversity of `{prompt, responses}` files (as `fdpo generate` writes; JSONL or Parquet).
    Diversity(DiversityArgs),
}

impl EvalCommand {
    /// Runs the evaluation.
    pub fn run(self) -> Result<()> {
        match self {
            EvalCommand::Diversity(a) => run_diversity(a),
        }
    }
}

/// Arguments of `fdpo eval diversity`.
#[derive(Debug, Args)]
pub struct DiversityArgs {
    /// Samples files to compare (e.g. SFT against DPO samples).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Tokenize with this model directory's tokenizer.json (default: whitespace words).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size V of EAD, at least 1 (default: the tokenizer's, else 50257 as in Kirk et
    /// al.).
    #[arg(long, value_parser = crate::cmd::parse::at_least_one)]
    pub vocab_size: Option<usize>,
    /// Sentence encoder for embedding diversity (a local sentence-transformers BERT directory);
    /// default: all-MiniLM-L6-v2 as installed by scripts/setup-encoders.sh.
    #[arg(long)]
    pub embedder: Option<PathBuf>,
    /// Skip embedding diversity.
    #[arg(long, conflicts_with = "embedder")]
    pub no_embedding: bool,
    /// NLI diversity with this local BERT/RoBERTa sequence-classification NLI directory (its
    /// id2label names contradiction, neutral and entailment).
    #[arg(long)]
    pub nli: Option<PathBuf>,
    /// Also report the mean token entropy of this model (a local HF directory) on each file's
    /// samples.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device of --model: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Working dtype of --model: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Folder for diversity.json and diversity.{svg,png}.
    #[arg(long, default_value = "runs/eval-diversity")]
    pub output_dir: PathBuf,
    /// Print the JSON report instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn run_diversity(args: DiversityArgs) -> Result<()> {
    let tokenizer = args.tokenizer.as_deref().map(TextTokenizer::load).transpose()?;
    let vocab_size = args.vocab_size.or(tokenizer.as_ref().map(|t| t.vocab_size())).unwrap_or(50_257);
    let policy = match &args.model {
        Some(model) => Some(
            crate::cmd::model_args::ModelArgs {
                model: model.clone(),
                device: args.device.clone(),
                dtype: args.dtype.clone(),
            }
            .load()?,
        ),
        None => None,
    };
    let encoder = if args.no_embedding {
        None
    } else {
        let default = fdpo_model::encoder::default_encoder_dir();
        match &args.embedder {
            Some(dir) => Some(fdpo_model::encoder::SentenceEncoder::load(dir, &candle_core::Device::Cpu)?),
            None if default.join("model.safetensors").exists() => {
                Some(fdpo_model::encoder::SentenceEncoder::load(&default, &candle_core::Device::Cpu)?)
            }
            None => {
                eprintln!(
                    "note: no sentence encoder at {} (run scripts/setup-encoders.sh, or give --embedder DIR); \
                     embedding diversity skipped",
                    default.display()
                );
                None
            }
        }
    };
    let nli = args
        .nli
        .as_deref()
        .map(|d| fdpo_model::bert::NliClassifier::load(d, &candle_core::Device::Cpu))
        .transpose()?;
    let mut words = WordIds::default();
    let mut reports: Vec<(String, usize, Vec<MetricSummary>)> = Vec::new();
    // Every file is read and checked before any work, so a bad last file fails at once.
    let mut files = Vec::with_capacity(args.files.len());
    for path in &args.files {
        let samples = read_samples(path)?;
        if let Some(p) = &policy {
            // Tokenised by the one rule before any work, so that a prompt it
            // refuses (an empty plain prompt under a tokenizer without BOS)
            // is named by file and line at once.
            for set in &samples {
                for r in &set.responses {
                    let response = fdpo_data::Text::Plain(r.clone());
                    fdpo_data::tokenize(&p.tokenizer, &set.prompt, &response, "responses", false)
                        .map_err(fdpo_data::DataError::tokenize(&set.at))?;
                }
            }
        }
        files.push((path, samples));
    }
    for (path, samples) in files {
        let tokens = match &tokenizer {
            Some(t) => {
                let mut failed = None;
                let tokens = tokenize(&samples, |text| {
                    t.encode(text, false).unwrap_or_else(|e| {
                        failed.get_or_insert(e);
                        Vec::new()
                    })
                });
                if let Some(e) = failed {
                    return Err(e.into());
                }
                tokens
            }
            None => tokenize(&samples, |text| words.encode(text)),
        };
        let name =
            path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        let mut metrics = diversity(&tokens, vocab_size);
        if let Some(e) = &encoder {
            metrics.push(embedding_diversity(e, &samples)?);
        }
        if let Some(n) = &nli {
            metrics.push(nli_diversity(n, &samples)?);
        }
        if let Some(p) = &policy {
            metrics.push(policy_entropy(&p.model, &p.tokenizer, &samples, &p.device)?);
        }
        for m in &metrics {
            let left_out = samples.len() - m.prompts_counted;
            if left_out > 0 {
                eprintln!(
                    "warning: {}: {}: {left_out} of {} prompts left out of the per-input mean and std ({})",
                    path.display(),
                    m.metric,
                    samples.len(),
                    undefined_when(&m.metric)
                );
            }
        }
        reports.push((name, samples.len(), metrics));
    }
    let report = json!({
        "vocab_size": vocab_size,
        "tokenization": if tokenizer.is_some() { "model tokenizer" } else { "whitespace words" },
        "files": reports.iter().zip(&args.files).map(|((name, n, m), path)| json!({
            "name": name, "path": path.display().to_string(), "prompts": n, "metrics": m,
        })).collect::<Vec<_>>(),
    });
    let json_path = args.output_dir.join("diversity.json");
    write_file(&json_path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    let names: Vec<String> = reports[0].2.iter().map(|m| m.metric.clone()).collect();
    debug_assert!(names.iter().zip(METRICS).all(|(a, b)| a == b));
    debug_assert!(reports.iter().all(|(_, _, m)| m.len() == names.len()));
    let panels: Vec<BarPanel> = names
        .iter()
        .enumerate()
        .map(|(k, metric)| BarPanel {
            title: format!("{metric} (per-input; x: across-input)"),
            categories: reports.iter().map(|(n, _, _)| n.clone()).collect(),
            bars: reports.iter().map(|(_, _, m)| (m[k].per_input_mean, m[k].per_input_std)).collect(),
            markers: reports.iter().map(|(_, _, m)| m[k].across_input).collect(),
        })
        .collect();
    let figures = plot::save_bars(&panels, 3, &args.output_dir.join("diversity"))?;
    if args.json {
        println!("{report}");
    } else {
        let mut table = Table::new(&[
            "file",
            "prompts counted",
            "metric",
            "per-input mean",
            "per-input std",
            "across-input",
        ]);
        for (name, n, metrics) in &reports {
            for m in metrics {
                table.push(vec![
                    name.clone(),
                    format!("{} of {n}", m.prompts_counted),
                    m.metric.clone(),
                    fmt_num(m.per_input_mean),
                    fmt_num(m.per_input_std),
                    fmt_num(m.across_input),
                ]);
            }
        }
        print!("{}", table.to_text());
    }
    crate::output::report_written(&[&json_path, &figures[0], &figures[1]]);
    Ok(())
}
