//! The Bradley–Terry reward-model trainer (`fdpo reward train`): the loss
//! −log σ(r(x, y_w) − r(x, y_l)) on preference pairs read by [`crate::data`],
//! metrics `accuracy` (share of pairs ranked right), `margin` (mean
//! r_w − r_l), `rewards/chosen`, `rewards/rejected`; the model is saved in
//! the sequence-classification layout (fdpo_model::reward).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fdpo_model::logprobs::PaddedBatch;
use fdpo_model::packing::Batching;
use fdpo_model::reward::{save_reward_model, RewardModel};
use fdpo_model::TextTokenizer;
use serde_json::Value;

use crate::config::TrainConfig;
use crate::data::{read_preferences, Limits, PreferenceData, PreferencePair};
use crate::dpo::{packed_pair_pass, report_data};
use crate::loss::log_sigmoid;
use crate::trainer::{
    begin_run, check_run, fit_to_context, BatchOutput, Objective, Observer, Outcome, Split, TrainError,
    Trainer,
};

/// The Bradley–Terry objective on a reward model.
pub struct RewardObjective<'a> {
    /// The model.
    pub model: &'a RewardModel,
    /// Training pairs.
    pub train: &'a [PreferencePair],
    /// Evaluation pairs.
    pub eval: &'a [PreferencePair],
    /// Micro-batch layout.
    pub batching: Batching,
    /// Where tensors live.
    pub device: Device,
}

fn mean(t: &Tensor) -> Result<f64, TrainError> {
    Ok(t.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Objective for RewardObjective<'_> {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.len(),
            Split::Eval => self.eval.len(),
        }
    }

    fn batch(&self, split: Split, indices: &[usize]) -> Result<BatchOutput, TrainError> {
        let data = if split == Split::Train { self.train } else { self.eval };
        let pairs: Vec<&PreferencePair> = indices.iter().map(|&i| &data[i]).collect();
        let b = pairs.len();
        let tokens = pairs.iter().map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len()).sum();
        let (chosen, rejected) = if self.batching.padding_free {
            let pad = self.model.pad_id();
            let scores = packed_pair_pass(&pairs, pad, self.batching, &self.device, |batch| {
                Ok(self.model.forward_packed(batch)?.to_dtype(DType::F32)?.reshape((b, 2))?)
            })?;
            (scores.narrow(1, 0, 1)?.squeeze(1)?, scores.narrow(1, 1, 1)?.squeeze(1)?)
        } else {
            let rows: Vec<(&[u32], &[u32])> = pairs
                .iter()
                .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
                .chain(pairs.iter().map(|p| (p.prompt.as_slice(), p.rejected.as_slice())))
                .collect();
            let batch = PaddedBatch::new(&rows, self.model.pad_id(), false, &self.device)?;
            let scores = self.model.forward(&batch.ids, &batch.attention)?.to_dtype(DType::F32)?;
            (scores.narrow(0, 0, b)?, scores.narrow(0, b, b)?)
        };
        let margin = (&chosen - &rejected)?;
        let loss = log_sigmoid(&margin)?.neg()?.mean_all()?;
        let metrics = vec![
            ("accuracy", mean(&chosen.gt(&rejected)?.to_dtype(DType::F32)?)?),
            ("margin", mean(&margin)?),
            ("rewards/chosen", mean(&chosen)?),
            ("rewards/rejected", mean(&rejected)?),
        ];
        Ok(BatchOutput { loss, metrics, tokens })
    }
}

/// Whether a model directory holds a sequence-classification checkpoint.
pub fn is_reward_model(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|c| {
            c.get("architectures")?.get(0)?.as_str().map(|a| a.ends_with("ForSequenceClassification"))
        })
        .unwrap_or(false)
}

/// What [`train_reward`] did besides training.
#[derive(Debug, Clone)]
pub struct RewardSummary {
    /// How the run ended.
    pub outcome: Outcome,
    /// Training data as read.
    pub train_data: PreferenceData,
    /// The step resumed from, if any.
    pub resumed_from: Option<usize>,
}

/// Trains a reward model as `config` says (`model` is a causal LM, whose
/// decoder gets a fresh head, or a reward model to continue; its f-DPO keys
/// are ignored); with `resume`, from the last complete checkpoint.
pub fn train_reward(
    config: &TrainConfig,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
    stop_after: Option<usize>,
) -> Result<RewardSummary, TrainError> {
    let checkpoint = check_run(config, resume)?;
    let config = &fit_to_context(config, true, observer)?;
    let tokenizer = TextTokenizer::load(&config.model)?;
    let limits = Limits {
        max_length: config.max_length,
        max_prompt_length: config.max_prompt_length,
        truncation: config.truncation,
    };
    let train_data = read_preferences(&config.train_file, &config.dataset_train_split, &tokenizer, &limits)?;
    report_data(&config.train_file, &train_data, observer);
    let eval = match &config.eval_file {
        Some(path) => {
            let data = read_preferences(path, &config.dataset_test_split, &tokenizer, &limits)?;
            report_data(path, &data, observer);
            data.pairs
        }
        None => vec![],
    };
    let source = checkpoint.as_ref().map_or(config.model.clone(), |(_, dir)| dir.clone());
    let pad = tokenizer.pad_id();
    let (model, weights) = if is_reward_model(&source) {
        RewardModel::load(&source, pad, DType::F32, device)?
    } else {
        RewardModel::from_causal_lm(&source, pad, config.seed, DType::F32, device)?
    };
    let objective = RewardObjective {
        model: &model,
        train: &train_data.pairs,
        eval: &eval,
        batching: config.batching,
        device: device.clone(),
    };
    // Metadata is copied from the model the run started from: a
    // resumed-from checkpoint may be pruned later.
    let saver = |dir: &Path| save_reward_model(&weights, &model, &config.model, dir);
    let mut trainer =
        Trainer::new(config, &weights, &config.model, train_data.pairs.len())?.with_saver(Box::new(saver));
    begin_run(config, resume)?;
    if let Some((_, dir)) = &checkpoint {
        trainer.resume_from(dir)?;
    }
    let outcome = trainer.run(&objective, observer, stop_after)?;
    Ok(RewardSummary { outcome, train_data, resumed_from: checkpoint.map(|(s, _)| s) })
}
