//! `fdpo logprobs`: sequence log-probabilities of responses (or of both
//! sides of preference pairs) under a model, added to each record.
//!
//! Rows are read and tokenised as the trainer reads them (`fdpo_data`):
//! JSONL, Parquet or a dataset folder; plain text gets EOS appended to the
//! response (`--no-eos` scores it as written), conversational responses are
//! the chat template's rendered tail. So the pairs' numbers are the ones
//! the trainer's reference cache holds for the same model.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use fdpo_data::records::{read_rows, PreferenceRecord, ResponseRecord};
use fdpo_data::{tokenize_group, DataError};
use fdpo_model::logprobs::sequence_logprobs;
use serde_json::Value;

use super::model_args::ModelArgs;
use crate::output::{progress, write_file};

/// Arguments of `fdpo logprobs`.
#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `{"prompt", "response"}` or `{"prompt", "chosen", "rejected"}` records
    /// (implicit and conversational forms too): a .jsonl, a .parquet or a
    /// dataset folder.
    #[arg(long)]
    pub data: PathBuf,
    /// The split of a dataset folder.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Output JSONL: each record with `logprob` and `tokens` added (or
    /// `chosen_logprob`, `rejected_logprob`, `chosen_tokens`, `rejected_tokens`).
    #[arg(long)]
    pub out: PathBuf,
    /// Score plain-text responses as written, without the EOS the trainer appends.
    #[arg(long)]
    pub no_eos: bool,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8, value_parser = crate::cmd::parse::at_least_one)]
    pub batch_size: usize,
}

/// Runs `fdpo logprobs`.
pub fn run(args: LogprobsArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let rows = read_rows(&args.data, &args.split)?;
    let max = loaded.model.max_positions();
    // Every sequence to score: (row index, output key prefix, prompt ids, response ids).
    let mut jobs = Vec::new();
    for (k, row) in rows.iter().enumerate() {
        let at = &row.at;
        let obj = &row.fields;
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
        // A pair's two sides share the prompt the trainer cuts for them.
        let (fields, group) = if is_pair {
            let pair = row.parse::<PreferenceRecord>()?.pair().map_err(|m| DataError::record(at, m))?;
            let sides = [("chosen", &pair.chosen), ("rejected", &pair.rejected)];
            (
                vec!["chosen", "rejected"],
                tokenize_group(&loaded.tokenizer, &pair.prompt, &sides, !args.no_eos),
            )
        } else {
            let r = row.parse::<ResponseRecord>()?;
            let sides = [("response", &r.response)];
            (vec!["response"], tokenize_group(&loaded.tokenizer, &r.prompt, &sides, !args.no_eos))
        };
        let group = group.map_err(DataError::tokenize(at))?;
        for (field, response) in fields.into_iter().zip(group.responses) {
            let len = group.prompt.len() + response.len();
            if len > max {
                bail!(
                    "{at}: field `{field}`: prompt + response is {len} tokens, longer than the model's {max}"
                );
            }
            let prefix = if is_pair { format!("{field}_") } else { String::new() };
            jobs.push((k, prefix, group.prompt.clone(), response));
        }
    }
    let bar = progress(jobs.len(), "logprobs");
    let mut outputs: Vec<serde_json::Map<String, Value>> = rows.iter().map(|r| r.fields.clone()).collect();
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
    eprintln!("wrote {} ({} records)", args.out.display(), rows.len());
    Ok(())
}
