//! Supervised fine-tuning on the trainer's machinery (`fdpo sft`): the loss
//! is the mean negative log-likelihood per token over completion tokens (or
//! over every token with `completion_only_loss = false`).
//!
//! Data (JSONL, Parquet or a dataset folder; TRL's SFT forms):
//! `{prompt, completion}` (strings, or lists of messages), `{text}`, or
//! `{messages}`, tokenised by `fdpo_data`'s one rule as TRL 1.16's
//! `SFTTrainer` does: prompt/completion as a prompt and its response (EOS
//! appended to plain text), the loss on the completion unless
//! `completion_only_loss = false`; `{text}` with EOS appended and
//! `{messages}` rendered whole by the chat template, every token learned.
//! Sequences longer than `max_length` keep their start; a prompt that alone
//! fills `max_length` is dropped and counted, as are empty completions.

use std::path::Path;

use candle_core::{DType, Device};
use fdpo_data::records::{read_records, SftForm, SftRecord};
use fdpo_data::tokenize::{tokenize_conversation, tokenize_text};
use fdpo_data::{tokenize, DataError, Text};
use fdpo_model::logprobs::{response_logprob_sums_from_hidden, target_logprob_sums, PaddedBatch};
use fdpo_model::packing::{Batching, PackedBatch, Scored, Sequence, ROW_TOKENS};
use fdpo_model::{CausalLm, TextTokenizer};

use crate::config::TrainConfig;
use crate::data::{Fit, Limits};
use crate::trainer::{
    begin_run, check_run, fit_to_context, BatchOutput, Objective, Observer, Outcome, Split, TrainError,
    Trainer,
};

/// One tokenised example: the loss covers `completion` (and `prompt` too
/// when the loss is on every token).
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    /// `id` from the file, else `line-N` (JSONL) or `row-N` (Parquet).
    pub id: String,
    /// Prompt ids (empty for `{text}`).
    pub prompt: Vec<u32>,
    /// Completion ids.
    pub completion: Vec<u32>,
}

/// Examples read from a file, with what was skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SftData {
    /// Usable examples in file order.
    pub examples: Vec<SftExample>,
    /// Records with an empty completion.
    pub skipped_empty: usize,
    /// Examples cut to `max_length`.
    pub truncated: usize,
    /// Examples whose prompt alone reaches `max_length`.
    pub dropped: usize,
}

/// Reads and tokenises the `split` of an SFT data path.
pub fn read_sft(
    path: &Path,
    split: &str,
    tokenizer: &TextTokenizer,
    max_length: usize,
) -> Result<SftData, DataError> {
    let mut data = SftData::default();
    for (at, record) in read_records::<SftRecord>(path, split)? {
        let id = record.id.clone().unwrap_or_else(|| at.default_id());
        let form = record.form().map_err(|m| DataError::record(&at, m))?;
        let (prompt, mut completion) = match form {
            SftForm::Text(t) => {
                if t.trim().is_empty() {
                    data.skipped_empty += 1;
                    continue;
                }
                (vec![], tokenize_text(tokenizer, &t).map_err(|e| DataError::tokenize(&at)(e.into()))?)
            }
            SftForm::PromptCompletion { prompt, completion } => {
                if completion.is_blank() {
                    data.skipped_empty += 1;
                    continue;
                }
                let t = tokenize(tokenizer, &prompt, &completion, "completion", true)
                    .map_err(DataError::tokenize(&at))?;
                (t.prompt, t.response)
            }
            SftForm::Conversation(all) => {
                if Text::Messages(all.clone()).is_blank() {
                    data.skipped_empty += 1;
                    continue;
                }
                // TRL: the whole chat, every token learned (assistant_only_loss
                // is not supported).
                (
                    vec![],
                    tokenize_conversation(tokenizer, &all).map_err(|e| DataError::tokenize(&at)(e.into()))?,
                )
            }
        };
        let mut prompt = prompt;
        match Limits::keep_start(max_length).fit(&mut prompt, &mut [&mut completion]) {
            Fit::Whole => {}
            Fit::Truncated => data.truncated += 1,
            Fit::Dropped => {
                data.dropped += 1;
                continue;
            }
        }
        data.examples.push(SftExample { id, prompt, completion });
    }
    Ok(data)
}

/// The SFT objective.
pub struct SftObjective<'a> {
    /// The model.
    pub model: &'a CausalLm,
    /// Training examples.
    pub train: &'a [SftExample],
    /// Evaluation examples.
    pub eval: &'a [SftExample],
    /// Loss on completion tokens only.
    pub completion_only_loss: bool,
    /// Padding id.
    pub pad_id: u32,
    /// Micro-batch layout (prefix sharing does not apply: one response each).
    pub batching: Batching,
    /// Where tensors live.
    pub device: Device,
}

impl Objective for SftObjective<'_> {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Eval => self.eval.len(),
        }
    }

    fn batch(&self, split: Split, indices: &[usize]) -> Result<BatchOutput, TrainError> {
        let data = if split == Split::Train { self.train } else { self.eval };
        let rows: Vec<(&[u32], &[u32])> =
            indices.iter().map(|&i| (data[i].prompt.as_slice(), data[i].completion.as_slice())).collect();
        let tokens = rows.iter().map(|(p, c)| p.len() + c.len()).sum();
        let (sums, counts) = if self.batching.padding_free {
            let branches: Vec<[&[u32]; 1]> = rows.iter().map(|(_, c)| [*c]).collect();
            let seqs: Vec<Sequence> =
                rows.iter().zip(&branches).map(|((p, _), br)| Sequence { prefix: p, branches: br }).collect();
            let scored = if self.completion_only_loss { Scored::Branches } else { Scored::Whole };
            let batch = PackedBatch::new(&seqs, ROW_TOKENS, scored, self.pad_id, &self.device)?;
            let hidden = self.model.forward_packed(&batch)?;
            target_logprob_sums(self.model, &hidden, &batch.targets)?
        } else {
            let batch = PaddedBatch::new(&rows, self.pad_id, !self.completion_only_loss, &self.device)?;
            let hidden = self.model.forward_hidden(&batch.ids, Some(&batch.attention), None)?;
            response_logprob_sums_from_hidden(self.model, &hidden, &batch.ids, &batch.response)?
        };
        let count = counts.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
        let loss = (sums.sum_all()?.neg()? / count)?;
        Ok(BatchOutput { loss, metrics: vec![("num_loss_tokens", count)], tokens })
    }
}

/// What [`train_sft`] did besides training.
#[derive(Debug, Clone)]
pub struct SftSummary {
    /// How the run ended.
    pub outcome: Outcome,
    /// Training data as read.
    pub train_data: SftData,
    /// The step resumed from, if any.
    pub resumed_from: Option<usize>,
}

/// Runs SFT as `config` says (its f-DPO keys are ignored), writing the run
/// folder; with `resume`, from the last complete checkpoint.
pub fn train_sft(
    config: &TrainConfig,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
    stop_after: Option<usize>,
) -> Result<SftSummary, TrainError> {
    let checkpoint = check_run(config, resume)?;
    let config = &fit_to_context(config, false, observer)?;
    let tokenizer = TextTokenizer::load(&config.model)?;
    let read = |path: &Path, split: &str, observer: &mut dyn Observer| -> Result<SftData, TrainError> {
        let data = read_sft(path, split, &tokenizer, config.max_length)?;
        if data.skipped_empty + data.truncated + data.dropped > 0 {
            observer.warn(&format!(
                "{}: {} examples used; {} skipped (empty completion), {} truncated to max_length, {} dropped (prompt reaches max_length)",
                path.display(),
                data.examples.len(),
                data.skipped_empty,
                data.truncated,
                data.dropped
            ));
        }
        Ok(data)
    };
    let train_data = read(&config.train_file, &config.dataset_train_split, observer)?;
    let eval = match &config.eval_file {
        Some(p) => read(p, &config.dataset_test_split, observer)?.examples,
        None => vec![],
    };
    let source = checkpoint.as_ref().map_or(config.model.clone(), |(_, dir)| dir.clone());
    let (model, weights) = CausalLm::load(&source, DType::F32, device)?;
    let objective = SftObjective {
        model: &model,
        train: &train_data.examples,
        eval: &eval,
        completion_only_loss: config.completion_only_loss,
        batching: config.batching,
        pad_id: tokenizer.pad_id(),
        device: device.clone(),
    };
    // Metadata (config.json, tokenizer) is copied from the model the run
    // started from: a resumed-from checkpoint may be pruned later.
    let mut trainer = Trainer::new(config, &weights, &config.model, train_data.examples.len())?;
    begin_run(config, resume)?;
    if let Some((_, dir)) = &checkpoint {
        trainer.resume_from(dir)?;
    }
    let outcome = trainer.run(&objective, observer, stop_after)?;
    Ok(SftSummary { outcome, train_data, resumed_from: checkpoint.map(|(s, _)| s) })
}
