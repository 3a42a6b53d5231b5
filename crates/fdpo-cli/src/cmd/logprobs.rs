//! `fdpo logprobs`: sequence log-probabilities of responses (or of both
//! sides of preference pairs) under a model, added to each JSONL line.
//!
//! Convention (shared with the trainer and TRL): prompt and response are
//! tokenised separately — the prompt with special tokens, the response
//! without — and concatenated.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use fdpo_model::logprobs::{has_context, sequence_logprobs, NO_CONTEXT};
use serde_json::Value;

use super::model_args::{prompt_ids, read_jsonl, text_field, ModelArgs};
use crate::output::{progress, write_file};

/// Arguments of `fdpo logprobs`.
#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL input: {"prompt", "response"} or {"prompt", "chosen", "rejected"} per line (strings,
    /// or lists of {role, content} messages rendered with the chat template).
    #[arg(long)]
    pub data: PathBuf,
    /// JSONL output: the input lines with `logprob` and `tokens` (or `chosen_logprob`,
    /// `rejected_logprob`, `chosen_tokens`, `rejected_tokens`) added.
    #[arg(long)]
    pub out: PathBuf,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8, value_parser = crate::cmd::parse::at_least_one)]
    pub batch_size: usize,
}

/// Runs `fdpo logprobs`.
pub fn run(args: LogprobsArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let records = read_jsonl(&args.data)?;
    let max = loaded.model.max_positions();
    // Every sequence to score: (record index, output key prefix, prompt ids, response ids).
    let mut jobs = Vec::new();
    for (k, (line, obj)) in records.iter().enumerate() {
        let at = format!("{}:{line}", args.data.display());
        let (prompt, templated) = text_field(obj, "prompt", &at, &loaded.tokenizer, true)?
            .ok_or_else(|| anyhow::anyhow!("{at}: missing field `prompt`"))?;
        let p = prompt_ids(&loaded.tokenizer, &prompt, templated)?;
        let is_pair = obj.contains_key("chosen") || obj.contains_key("rejected");
        if is_pair && obj.contains_key("response") {
            let given: Vec<String> = ["response", "chosen", "rejected"]
                .iter()
                .filter(|f| obj.contains_key(**f))
                .map(|f| format!("`{f}`"))
                .collect();
            bail!(
                "{at}: fields {}: give either `response` or `chosen` and `rejected`, not both",
                given.join(", ")
            );
        }
        let fields: &[(&str, &str)] =
            if is_pair { &[("chosen", "chosen_"), ("rejected", "rejected_")] } else { &[("response", "")] };
        for (field, prefix) in fields {
            let (text, _) = text_field(obj, field, &at, &loaded.tokenizer, false)?
                .ok_or_else(|| anyhow::anyhow!("{at}: missing field `{field}`"))?;
            let r = loaded.tokenizer.encode(&text, false)?;
            if !has_context(&p, &r) {
                bail!("{at}: field `prompt`: {NO_CONTEXT}");
            }
            if p.len() + r.len() > max {
                bail!(
                    "{at}: field `{field}`: prompt + response is {} tokens, longer than the model's {max}",
                    p.len() + r.len()
                );
            }
            jobs.push((k, *prefix, p.clone(), r));
        }
    }
    let bar = progress(jobs.len(), "logprobs");
    let mut outputs: Vec<serde_json::Map<String, Value>> = records.iter().map(|(_, o)| o.clone()).collect();
    for batch in jobs.chunks(args.batch_size) {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            batch.iter().map(|(_, _, p, r)| (p.clone(), r.clone())).collect();
        let scores = sequence_logprobs(&loaded.model, &pairs, loaded.tokenizer.pad_id(), &loaded.device)?;
        for ((k, prefix, _, _), s) in batch.iter().zip(scores) {
            outputs[*k].insert(format!("{prefix}logprob"), Value::from(s.logprob_sum));
            outputs[*k].insert(format!("{prefix}tokens"), Value::from(s.tokens));
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let mut text = String::new();
    for o in outputs {
        text.push_str(&serde_json::to_string(&o)?);
        text.push('\n');
    }
    write_file(&args.out, text.as_bytes())?;
    eprintln!("wrote {} ({} lines)", args.out.display(), records.len());
    Ok(())
}
