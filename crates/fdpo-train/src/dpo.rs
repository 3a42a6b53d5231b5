//! The f-DPO trainer: preference pairs, cached reference log-probabilities
//! and the loss of [`crate::loss`] as an [`Objective`], and [`train_dpo`],
//! the whole run behind `fdpo train`.
//!
//! Metrics (TRL's names): `rewards/chosen`, `rewards/rejected`,
//! `rewards/margins`, `rewards/accuracies` in β·ℓ units (ℓ = log π/π_ref of
//! the response), the same in β·f'(π/π_ref) units under `f_rewards/` (what
//! the f-DPO loss compares; equal to the former for reverse KL), and
//! `logps/chosen`, `logps/rejected` (Σ log π over the response); `nll_loss`
//! when `sft_weight` > 0.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fdpo_model::logprobs::{response_logprob_sums_from_hidden, target_logprob_sums, PaddedBatch};
use fdpo_model::packing::{Batching, PackedBatch, Scored, Sequence, ROW_TOKENS};
use fdpo_model::{CausalLm, TextTokenizer};

use crate::config::TrainConfig;
use crate::data::{read_preferences, Limits, PreferenceData, PreferencePair};
use crate::loss::{dpo_loss, LossConfig};
use crate::reference::{self, CacheStatus, ReferenceLogps};
use crate::trainer::{
    begin_run, check_run, fit_to_context, BatchOutput, Objective, Observer, Outcome, Split, TrainError,
    Trainer,
};

/// Pairs of one split with their reference log-probabilities.
#[derive(Debug, Clone, Default)]
pub struct PreferenceSplit {
    /// The pairs.
    pub pairs: Vec<PreferencePair>,
    /// log π_ref of each pair's responses (zeros when reference-free).
    pub reference: ReferenceLogps,
}

/// The f-DPO objective on a policy model.
pub struct DpoObjective<'a> {
    /// The policy.
    pub model: &'a CausalLm,
    /// Loss settings.
    pub loss: LossConfig,
    /// Weight of the NLL of the chosen response (per token).
    pub sft_weight: f64,
    /// Training pairs.
    pub train: &'a PreferenceSplit,
    /// Evaluation pairs.
    pub eval: &'a PreferenceSplit,
    /// Padding id.
    pub pad_id: u32,
    /// Micro-batch layout.
    pub batching: Batching,
    /// Where tensors live.
    pub device: Device,
}

/// What [`policy_logps`] computes for b preference pairs.
#[derive(Debug)]
pub struct PolicyLogps {
    /// Σ log π(y_w | x) per pair, (b,), differentiable.
    pub chosen: Tensor,
    /// Σ log π(y_l | x) per pair, (b,), differentiable.
    pub rejected: Tensor,
    /// Tokens of each chosen response, (b,).
    pub chosen_tokens: Tensor,
    /// Tokens of each rejected response, (b,).
    pub rejected_tokens: Tensor,
    /// Tokens a padded pass computes besides its padding, Σ (P + C) + (P + R)
    /// (a shared prompt counts twice: the figure compares layouts' speed).
    pub tokens: usize,
}

/// Policy log-probabilities of chosen and rejected responses and their
/// token counts, in one forward pass: packed without padding (the prompt
/// computed once for both responses with `prefix_sharing`) or over 2b
/// right-padded rows.
pub fn policy_logps(
    model: &CausalLm,
    pairs: &[&PreferencePair],
    pad_id: u32,
    batching: Batching,
    device: &Device,
) -> Result<PolicyLogps, TrainError> {
    let b = pairs.len();
    // What a padded step would process without padding: (P + C) + (P + R).
    let tokens = pairs.iter().map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len()).sum();
    if !batching.padding_free {
        let rows: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| (p.prompt.as_slice(), p.chosen.as_slice()))
            .chain(pairs.iter().map(|p| (p.prompt.as_slice(), p.rejected.as_slice())))
            .collect();
        let batch = PaddedBatch::new(&rows, pad_id, false, device)?;
        let hidden = model.forward_hidden(&batch.ids, Some(&batch.attention), None)?;
        let (sums, counts) = response_logprob_sums_from_hidden(model, &hidden, &batch.ids, &batch.response)?;
        return Ok(PolicyLogps {
            chosen: sums.narrow(0, 0, b)?,
            rejected: sums.narrow(0, b, b)?,
            chosen_tokens: counts.narrow(0, 0, b)?,
            rejected_tokens: counts.narrow(0, b, b)?,
            tokens,
        });
    }
    // Branches numbered chosen 0, rejected 0, chosen 1, …, either way.
    let (sums, counts) = packed_pair_pass(pairs, pad_id, batching, device, |batch| {
        let hidden = model.forward_packed(batch)?;
        Ok(target_logprob_sums(model, &hidden, &batch.targets)?)
    })?;
    let side = |x: &Tensor, k: usize| -> candle_core::Result<Tensor> {
        x.reshape((b, 2))?.narrow(1, k, 1)?.squeeze(1)
    };
    Ok(PolicyLogps {
        chosen: side(&sums, 0)?,
        rejected: side(&sums, 1)?,
        chosen_tokens: side(&counts, 0)?,
        rejected_tokens: side(&counts, 1)?,
        tokens,
    })
}

/// Packs preference pairs — [prompt | chosen | rejected] with
/// `prefix_sharing`, else [prompt | chosen] and [prompt | rejected] — and
/// runs `f` on the batch. Branch 2i is pair i's chosen response, 2i + 1
/// its rejected one.
pub fn packed_pair_pass<T>(
    pairs: &[&PreferencePair],
    pad_id: u32,
    batching: Batching,
    device: &Device,
    f: impl FnOnce(&PackedBatch) -> Result<T, TrainError>,
) -> Result<T, TrainError> {
    let both: Vec<[&[u32]; 2]> = pairs.iter().map(|p| [p.chosen.as_slice(), p.rejected.as_slice()]).collect();
    let seqs: Vec<Sequence> = if batching.prefix_sharing {
        pairs.iter().zip(&both).map(|(p, br)| Sequence { prefix: &p.prompt, branches: br }).collect()
    } else {
        pairs
            .iter()
            .zip(&both)
            .flat_map(|(p, br)| {
                [0, 1].map(|k| Sequence { prefix: &p.prompt, branches: std::slice::from_ref(&br[k]) })
            })
            .collect()
    };
    f(&PackedBatch::new(&seqs, ROW_TOKENS, Scored::Branches, pad_id, device)?)
}

fn mean(t: &Tensor) -> Result<f64, TrainError> {
    Ok(t.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Objective for DpoObjective<'_> {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.pairs.len(),
            Split::Eval => self.eval.pairs.len(),
        }
    }

    fn batch(&self, split: Split, indices: &[usize]) -> Result<BatchOutput, TrainError> {
        let data = match split {
            Split::Train => self.train,
            Split::Eval => self.eval,
        };
        let pairs: Vec<&PreferencePair> = indices.iter().map(|&i| &data.pairs[i]).collect();
        let PolicyLogps { chosen: pc, rejected: pr, chosen_tokens: nc, tokens, .. } =
            policy_logps(self.model, &pairs, self.pad_id, self.batching, &self.device)?;
        let reference = |v: &[f64]| -> Result<Tensor, TrainError> {
            let x: Vec<f32> = indices.iter().map(|&i| v[i] as f32).collect();
            Ok(Tensor::from_vec(x, indices.len(), &self.device)?)
        };
        let (rc, rr) = (reference(&data.reference.chosen)?, reference(&data.reference.rejected)?);
        let out = dpo_loss(&self.loss, &pc, &pr, &rc, &rr)?;
        let mut loss = out.loss;
        let mut metrics = vec![];
        if self.sft_weight > 0.0 {
            let nll = (pc.sum_all()?.neg()? / nc.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)?;
            metrics.push(("nll_loss", nll.to_dtype(DType::F64)?.to_scalar::<f64>()?));
            loss = (loss + (nll * self.sft_weight)?)?;
        }
        let (cr, rj) = (&out.chosen_rewards, &out.rejected_rewards);
        let (fc, fr) = (&out.chosen_f_rewards, &out.rejected_f_rewards);
        metrics.extend([
            ("rewards/chosen", mean(cr)?),
            ("rewards/rejected", mean(rj)?),
            ("rewards/margins", mean(&(cr - rj)?)?),
            ("rewards/accuracies", mean(&cr.gt(rj)?.to_dtype(DType::F32)?)?),
            ("f_rewards/chosen", mean(fc)?),
            ("f_rewards/rejected", mean(fr)?),
            ("f_rewards/margins", mean(&(fc - fr)?)?),
            ("f_rewards/accuracies", mean(&fc.gt(fr)?.to_dtype(DType::F32)?)?),
            ("logps/chosen", mean(&pc)?),
            ("logps/rejected", mean(&pr)?),
        ]);
        Ok(BatchOutput { loss, metrics, tokens })
    }
}

/// What [`train_dpo`] did besides training.
#[derive(Debug, Clone)]
pub struct DpoSummary {
    /// How the run ended.
    pub outcome: Outcome,
    /// Training data as read (counts of skipped, truncated, dropped pairs).
    pub train_data: PreferenceData,
    /// The reference cache of the training split.
    pub cache: Option<CacheStatus>,
    /// The step resumed from, if any.
    pub resumed_from: Option<usize>,
}

/// Reads a preference split and its reference log-probabilities (cached in
/// `<output_dir>/reference/<name>/`).
fn load_split(
    config: &TrainConfig,
    path: &Path,
    split: &str,
    name: &str,
    tokenizer: &TextTokenizer,
    device: &Device,
) -> Result<(PreferenceData, PreferenceSplit, Option<CacheStatus>), TrainError> {
    let limits = Limits {
        max_length: config.max_length,
        max_prompt_length: config.max_prompt_length,
        truncation: config.truncation,
    };
    let data = read_preferences(path, split, tokenizer, &limits)?;
    let n = data.pairs.len();
    if config.reference_free {
        let reference = ReferenceLogps { chosen: vec![0.0; n], rejected: vec![0.0; n] };
        return Ok((data.clone(), PreferenceSplit { pairs: data.pairs, reference }, None));
    }
    let settings = format!("{limits:?}");
    let (reference, status) = reference::cached(config, &data.pairs, &settings, name, device)?;
    Ok((data.clone(), PreferenceSplit { pairs: data.pairs, reference }, Some(status)))
}

/// Runs f-DPO as `config` says: reads the data, computes or reuses the
/// reference log-probabilities (the reference model is dropped before the
/// policy is loaded), trains, and writes the run folder. With `resume`, the
/// run continues from the last complete checkpoint in `output_dir`.
pub fn train_dpo(
    config: &TrainConfig,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
    stop_after: Option<usize>,
) -> Result<DpoSummary, TrainError> {
    let checkpoint = check_run(config, resume)?;
    let config = &fit_to_context(config, true, observer)?;
    let tokenizer = TextTokenizer::load(&config.model)?;
    let (train_data, train, cache) =
        load_split(config, &config.train_file, &config.dataset_train_split, "train", &tokenizer, device)?;
    report_data(&config.train_file, &train_data, observer);
    report_cache(config, "train", cache.as_ref(), observer);
    let eval = match &config.eval_file {
        Some(path) => {
            let (data, split, status) =
                load_split(config, path, &config.dataset_test_split, "eval", &tokenizer, device)?;
            report_data(path, &data, observer);
            report_cache(config, "eval", status.as_ref(), observer);
            split
        }
        None => PreferenceSplit::default(),
    };
    let source = checkpoint.as_ref().map_or(config.model.clone(), |(_, dir)| dir.clone());
    let (model, weights) = CausalLm::load(&source, DType::F32, device)?;
    let objective = DpoObjective {
        model: &model,
        loss: LossConfig {
            divergence: config.divergence,
            loss_type: config.loss_type,
            beta: config.beta,
            label_smoothing: config.label_smoothing,
            reference_free: config.reference_free,
        },
        sft_weight: config.sft_weight,
        train: &train,
        eval: &eval,
        pad_id: tokenizer.pad_id(),
        batching: config.batching,
        device: device.clone(),
    };
    // Metadata (config.json, tokenizer) is copied from the model the run
    // started from: a resumed-from checkpoint may be pruned later.
    let mut trainer = Trainer::new(config, &weights, &config.model, train.pairs.len())?;
    begin_run(config, resume)?;
    if let Some((_, dir)) = &checkpoint {
        trainer.resume_from(dir)?;
    }
    let outcome = trainer.run(&objective, observer, stop_after)?;
    Ok(DpoSummary { outcome, train_data, cache, resumed_from: checkpoint.map(|(s, _)| s) })
}

/// Tells the observer when a split's reference cache was for another
/// reference checkpoint, data or length settings, and was recomputed.
pub(crate) fn report_cache(
    config: &TrainConfig,
    name: &str,
    status: Option<&CacheStatus>,
    observer: &mut dyn Observer,
) {
    if let Some(CacheStatus::Stale { .. }) = status {
        observer.warn(&format!(
            "{}: the cached reference log-probabilities were for another reference checkpoint, data or length settings; recomputed",
            config.output_dir.join("reference").join(name).display()
        ));
    }
}

/// Tells the observer what was skipped, cut or dropped.
pub fn report_data(path: &Path, data: &PreferenceData, observer: &mut dyn Observer) {
    let mut parts = vec![];
    for (n, what) in [
        (data.skipped_empty, "skipped (empty chosen or rejected)"),
        (data.skipped_identical, "skipped (chosen = rejected)"),
        (data.truncated, "truncated to the length limits"),
        (data.dropped, "dropped (over the length limits)"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if !parts.is_empty() {
        observer.warn(&format!("{}: {} pairs used; {}", path.display(), data.pairs.len(), parts.join(", ")));
    }
}
