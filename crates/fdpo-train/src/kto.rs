//! KTO (Ethayarajh et al. 2024, arXiv 2402.01306) as TRL 1.16's
//! `KTOTrainer` computes it, behind `fdpo kto`: alignment from unpaired
//! examples, each a completion marked desirable or not.
//!
//! Data: TRL's unpaired form `{prompt, completion, label}` (text or
//! messages; JSONL, Parquet or a dataset folder), or preference pairs,
//! unpaired as TRL's `unpair_preference_dataset` does it (per 1,000 rows:
//! every chosen completion as desirable, then every rejected one as
//! undesirable). Tokenised by `fdpo_data`'s one rule (EOS appended to
//! plain text; the prompt cut at the common prefix); a row whose prompt
//! fills `max_length` is dropped, and each sequence keeps its first
//! `max_length` tokens.
//!
//! The reference point: each example i is also scored on a mismatched
//! completion, that of the previous example in its chunk of
//! `per_device_train_batch_size` rows (rotated by one, the chunk's first
//! taking its last; built once, in data order, as TRL does), and
//! z₀ = max(0, mean over the batch of log π(y_j|x_i) − log π_ref(y_j|x_i)),
//! without gradient. With r = log π(y|x) − log π_ref(y|x):
//!
//! - `kto`: desirable 1 − σ(β(r − z₀)), undesirable 1 − σ(β(z₀ − r));
//! - `apo_zero_unpaired`: the same with z₀ = 0 (desirable 1 − σ(βr),
//!   undesirable σ(βr));
//!
//! each weighted by `desirable_weight` / `undesirable_weight` and averaged
//! over the batch (not renormalised by the weights). Reference
//! log-probabilities of both completions come from the reference cache.
//!
//! Metrics (TRL's names): `kl` (z₀), `rewards/chosen` and `logps/chosen`
//! (mean β·r and mean log π over the batch's desirable examples),
//! `rewards/rejected`, `logps/rejected` (undesirable), `rewards/margins`
//! (when both are present), and fdpo's `count/desirable`,
//! `count/undesirable`. Unlike TRL, batches are drawn in the trainer's
//! seeded order rather than sequentially; the mismatched pairs are TRL's.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fdpo_data::records::{read_rows, PreferenceRecord, UnpairedRecord};
use fdpo_data::{tokenize, DataError, Location, Text};
use fdpo_model::logprobs::{response_logprob_sums_from_hidden, target_logprob_sums, PaddedBatch};
use fdpo_model::packing::{Batching, PackedBatch, Scored, Sequence, ROW_TOKENS};
use fdpo_model::{CausalLm, TextTokenizer};

use crate::config::{KtoLossType, TrainConfig};
use crate::data::{Fit, Limits, PreferencePair};
use crate::reference::{self, CacheStatus, ReferenceLogps};
use crate::trainer::{
    begin_run, check_run, fit_to_context, BatchOutput, Objective, Observer, Outcome, Split, TrainError,
    Trainer,
};

/// One tokenised unpaired example.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedExample {
    /// `id` from the file, else `line-N` / `row-N`.
    pub id: String,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Completion ids (cut so that prompt + completion ≤ max_length).
    pub completion: Vec<u32>,
    /// The mismatched completion scored after this prompt (for z₀).
    pub kl_completion: Vec<u32>,
    /// Desirable.
    pub label: bool,
}

/// Unpaired examples read from a file, with what was dropped or cut.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UnpairedData {
    /// The usable examples, in data order.
    pub examples: Vec<UnpairedExample>,
    /// Desirable examples.
    pub desirable: usize,
    /// Undesirable examples.
    pub undesirable: usize,
    /// Examples whose prompt alone reaches max_length.
    pub dropped: usize,
    /// Examples whose completion was cut to max_length.
    pub truncated: usize,
    /// Whether the file held preference pairs, unpaired here.
    pub from_pairs: bool,
}

/// Rows per map batch of TRL's `unpair_preference_dataset` (`datasets`'
/// default): within each, all chosen rows come before all rejected ones.
const UNPAIR_CHUNK: usize = 1000;

/// The (prompt, completion, label) rows of a data path, unpairing
/// preference pairs as TRL does.
fn unpaired_records(path: &Path, split: &str) -> Result<(Vec<(Location, UnpairedRecord)>, bool), DataError> {
    let rows = read_rows(path, split)?;
    let paired =
        rows.first().is_some_and(|r| r.fields.contains_key("chosen") && !r.fields.contains_key("label"));
    if !paired {
        let records = rows
            .iter()
            .map(|r| Ok((r.at.clone(), r.parse::<UnpairedRecord>()?)))
            .collect::<Result<_, _>>()?;
        return Ok((records, false));
    }
    let mut out = Vec::with_capacity(2 * rows.len());
    for chunk in rows.chunks(UNPAIR_CHUNK) {
        let mut pairs = Vec::with_capacity(chunk.len());
        for row in chunk {
            let record = row.parse::<PreferenceRecord>()?;
            let id = record.id.clone();
            pairs.push((row.at.clone(), id, record.pair().map_err(|m| DataError::record(&row.at, m))?));
        }
        for label in [true, false] {
            for (at, id, pair) in &pairs {
                let completion = if label { pair.chosen.clone() } else { pair.rejected.clone() };
                let record =
                    UnpairedRecord { id: id.clone(), prompt: pair.prompt.clone(), completion, label };
                out.push((at.clone(), record));
            }
        }
    }
    Ok((out, true))
}

/// Reads and tokenises the `split` of an unpaired (or paired) data path;
/// the mismatched completions rotate within chunks of `chunk` examples.
pub fn read_unpaired(
    path: &Path,
    split: &str,
    tokenizer: &TextTokenizer,
    max_length: usize,
    chunk: usize,
) -> Result<UnpairedData, DataError> {
    let (records, from_pairs) = unpaired_records(path, split)?;
    let mut data = UnpairedData { from_pairs, ..Default::default() };
    let mut whole: Vec<UnpairedExample> = Vec::with_capacity(records.len());
    for (at, record) in records {
        if record.completion.is_blank() {
            let field = if from_pairs {
                if record.label {
                    "chosen"
                } else {
                    "rejected"
                }
            } else {
                "completion"
            };
            return Err(DataError::record(&at, format!("{} `{field}`: empty", at.noun())));
        }
        if matches!((&record.prompt, &record.completion), (Text::Plain(_), Text::Messages(_))) {
            return Err(DataError::record(
                &at,
                format!("{} `prompt`: text, but the completion is a list of messages", at.noun()),
            ));
        }
        let t = tokenize(tokenizer, &record.prompt, &record.completion, "completion", true)
            .map_err(DataError::tokenize(&at))?;
        if t.prompt.len() >= max_length {
            data.dropped += 1;
            continue;
        }
        let id = record.id.clone().unwrap_or_else(|| at.default_id());
        whole.push(UnpairedExample {
            id,
            prompt: t.prompt,
            completion: t.response,
            kl_completion: vec![],
            label: record.label,
        });
    }
    // TRL rotates the (uncut) completion ids by one within each chunk.
    let completions: Vec<Vec<u32>> = whole.iter().map(|e| e.completion.clone()).collect();
    for (c, examples) in whole.chunks_mut(chunk.max(1)).enumerate() {
        let n = examples.len();
        for (k, e) in examples.iter_mut().enumerate() {
            e.kl_completion = completions[c * chunk.max(1) + (k + n - 1) % n].clone();
        }
    }
    let limits = Limits::keep_start(max_length);
    for mut e in whole {
        // The prompt is below max_length (checked above): only cuts remain.
        if limits.fit(&mut e.prompt, &mut [&mut e.completion]) == Fit::Truncated {
            data.truncated += 1;
        }
        limits.fit(&mut e.prompt, &mut [&mut e.kl_completion]);
        if e.label {
            data.desirable += 1;
        } else {
            data.undesirable += 1;
        }
        data.examples.push(e);
    }
    Ok(data)
}

/// TRL's advice on the class balance: desirable_weight × n_desirable :
/// undesirable_weight × n_undesirable within [1, 4/3]. The warning, when
/// neither weight is in the range that would bring it there.
pub fn balance_warning(desirable: usize, undesirable: usize, dw: f64, uw: f64) -> Option<String> {
    let (nd, nu) = (desirable.max(1) as f64, undesirable.max(1) as f64);
    if nd == nu {
        return None;
    }
    // Python's round(x, 2): ties to even.
    let round = |x: f64| (x * 100.0).round_ties_even() / 100.0;
    let d_range = (round(nu * uw / nd), round(nu * uw / nd * 1.33));
    let u_range = (round(nd * dw / nu / 1.33), round(nd * dw / nu));
    let inside = |x: f64, (lo, hi): (f64, f64)| lo <= x && x <= hi;
    (!inside(dw, d_range) && !inside(uw, u_range)).then(|| {
        format!(
            "{desirable} desirable and {undesirable} undesirable examples: TRL advises desirable_weight × n_desirable : undesirable_weight × n_undesirable between 1:1 and 4:3, i.e. desirable_weight in [{}, {}] or undesirable_weight in [{}, {}] (now {dw} and {uw})",
            d_range.0, d_range.1, u_range.0, u_range.1
        )
    })
}

/// Settings of the KTO loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoLossConfig {
    /// kto or apo_zero_unpaired.
    pub loss_type: KtoLossType,
    /// β.
    pub beta: f64,
    /// Weight of desirable examples.
    pub desirable_weight: f64,
    /// Weight of undesirable examples.
    pub undesirable_weight: f64,
}

/// The KTO loss of a batch and the reference point it used.
#[derive(Debug)]
pub struct KtoLoss {
    /// Mean weighted loss (scalar, differentiable in the policy log-probs).
    pub loss: Tensor,
    /// z₀ (0 for apo_zero_unpaired).
    pub kl: f64,
    /// β·r per example, (n,).
    pub rewards: Tensor,
}

/// z₀ = max(0, mean(kl_policy − kl_reference)), a number: no gradient.
pub fn reference_point(kl_policy: &[f64], kl_reference: &[f64]) -> f64 {
    let n = kl_policy.len().max(1) as f64;
    (kl_policy.iter().zip(kl_reference).map(|(p, r)| p - r).sum::<f64>() / n).max(0.0)
}

/// The KTO loss from policy log-probs (n,) (differentiable), reference
/// log-probs (n,), labels and z₀.
pub fn kto_loss(
    cfg: &KtoLossConfig,
    policy: &Tensor,
    reference: &Tensor,
    labels: &[bool],
    kl: f64,
) -> candle_core::Result<KtoLoss> {
    let device = policy.device();
    let z0 = match cfg.loss_type {
        KtoLossType::Kto => kl,
        KtoLossType::ApoZeroUnpaired => 0.0,
    };
    let rewards = ((policy - reference)? * cfg.beta)?;
    // s = β(r − z₀); desirable 1 − σ(s) = σ(−s), undesirable 1 − σ(−s) = σ(s).
    let s = (&rewards - cfg.beta * z0)?;
    let sign: Vec<f32> = labels.iter().map(|&d| if d { -1.0 } else { 1.0 }).collect();
    let weight: Vec<f32> = labels
        .iter()
        .map(|&d| if d { cfg.desirable_weight } else { cfg.undesirable_weight } as f32)
        .collect();
    let n = labels.len();
    let signed = (s * Tensor::from_vec(sign, n, device)?)?;
    let losses = (candle_nn::ops::sigmoid(&signed)? * Tensor::from_vec(weight, n, device)?)?;
    Ok(KtoLoss { loss: losses.mean_all()?, kl: z0, rewards })
}

/// Unpaired examples of one split with their reference log-probabilities
/// (`chosen`: of the completion; `rejected`: of the mismatched completion).
#[derive(Debug, Clone, Default)]
pub struct UnpairedSplit {
    /// The examples.
    pub examples: Vec<UnpairedExample>,
    /// Reference log-probabilities.
    pub reference: ReferenceLogps,
}

/// An example as the reference cache stores it: the completion as
/// `chosen`, the mismatched completion as `rejected`.
fn as_pair(e: &UnpairedExample) -> PreferencePair {
    PreferencePair {
        id: e.id.clone(),
        prompt: e.prompt.clone(),
        chosen: e.completion.clone(),
        rejected: e.kl_completion.clone(),
    }
}

/// The KTO objective on a policy model.
pub struct KtoObjective<'a> {
    /// The policy.
    pub model: &'a CausalLm,
    /// Loss settings.
    pub loss: KtoLossConfig,
    /// Training examples.
    pub train: &'a UnpairedSplit,
    /// Evaluation examples.
    pub eval: &'a UnpairedSplit,
    /// Padding id.
    pub pad_id: u32,
    /// Micro-batch layout.
    pub batching: Batching,
    /// Where tensors live.
    pub device: Device,
}

/// Σ log π over each (prompt, response) row's response, (n,), and the
/// tokens processed; packed without padding unless `padding_free` is off.
/// (Prompts are not shared: the mismatched completions need no backward,
/// and sharing would put them in the policy's graph.)
fn logps(
    model: &CausalLm,
    rows: &[(&[u32], &[u32])],
    pad_id: u32,
    batching: Batching,
    device: &Device,
) -> Result<(Tensor, usize), TrainError> {
    let tokens = rows.iter().map(|(p, r)| p.len() + r.len()).sum();
    if !batching.padding_free {
        let batch = PaddedBatch::new(rows, pad_id, false, device)?;
        let hidden = model.forward_hidden(&batch.ids, Some(&batch.attention), None)?;
        let (sums, _) = response_logprob_sums_from_hidden(model, &hidden, &batch.ids, &batch.response)?;
        return Ok((sums, tokens));
    }
    let branches: Vec<[&[u32]; 1]> = rows.iter().map(|(_, r)| [*r]).collect();
    let seqs: Vec<Sequence> =
        rows.iter().zip(&branches).map(|((p, _), br)| Sequence { prefix: p, branches: br }).collect();
    let batch = PackedBatch::new(&seqs, ROW_TOKENS, Scored::Branches, pad_id, device)?;
    let hidden = model.forward_packed(&batch)?;
    let (sums, _) = target_logprob_sums(model, &hidden, &batch.targets)?;
    Ok((sums, tokens))
}

fn class_mean(values: &[f32], labels: &[bool], class: bool) -> Option<f64> {
    let picked: Vec<f64> =
        values.iter().zip(labels).filter(|(_, &l)| l == class).map(|(&v, _)| v as f64).collect();
    (!picked.is_empty()).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
}

impl Objective for KtoObjective<'_> {
    fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train.examples.len(),
            Split::Eval => self.eval.examples.len(),
        }
    }

    fn batch(&self, split: Split, indices: &[usize]) -> Result<BatchOutput, TrainError> {
        let data = match split {
            Split::Train => self.train,
            Split::Eval => self.eval,
        };
        let examples: Vec<&UnpairedExample> = indices.iter().map(|&i| &data.examples[i]).collect();
        let labels: Vec<bool> = examples.iter().map(|e| e.label).collect();
        let rows: Vec<(&[u32], &[u32])> =
            examples.iter().map(|e| (e.prompt.as_slice(), e.completion.as_slice())).collect();
        let (policy, mut tokens) = logps(self.model, &rows, self.pad_id, self.batching, &self.device)?;
        let kl = match self.loss.loss_type {
            KtoLossType::ApoZeroUnpaired => 0.0,
            KtoLossType::Kto => {
                let kl_rows: Vec<(&[u32], &[u32])> =
                    examples.iter().map(|e| (e.prompt.as_slice(), e.kl_completion.as_slice())).collect();
                let (kl_policy, kl_tokens) =
                    logps(self.model, &kl_rows, self.pad_id, self.batching, &self.device)?;
                tokens += kl_tokens;
                let kl_policy: Vec<f64> = kl_policy.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
                let kl_reference: Vec<f64> = indices.iter().map(|&i| data.reference.rejected[i]).collect();
                reference_point(&kl_policy, &kl_reference)
            }
        };
        let reference: Vec<f32> = indices.iter().map(|&i| data.reference.chosen[i] as f32).collect();
        let reference = Tensor::from_vec(reference, indices.len(), &self.device)?;
        let out = kto_loss(&self.loss, &policy, &reference, &labels, kl)?;
        let rewards = out.rewards.to_vec1::<f32>()?;
        let policy = policy.detach().to_vec1::<f32>()?;
        let desirable = labels.iter().filter(|&&l| l).count();
        let mut metrics = vec![
            ("kl", out.kl),
            ("count/desirable", desirable as f64),
            ("count/undesirable", (labels.len() - desirable) as f64),
        ];
        let chosen = class_mean(&rewards, &labels, true);
        let rejected = class_mean(&rewards, &labels, false);
        for (name, value) in [
            ("rewards/chosen", chosen),
            ("rewards/rejected", rejected),
            ("logps/chosen", class_mean(&policy, &labels, true)),
            ("logps/rejected", class_mean(&policy, &labels, false)),
            ("rewards/margins", chosen.zip(rejected).map(|(c, r)| c - r)),
        ] {
            metrics.extend(value.map(|v| (name, v)));
        }
        Ok(BatchOutput { loss: out.loss, metrics, tokens })
    }
}

/// What [`train_kto`] did besides training.
#[derive(Debug, Clone)]
pub struct KtoSummary {
    /// How the run ended.
    pub outcome: Outcome,
    /// Training data as read.
    pub train_data: UnpairedData,
    /// The reference cache of the training split.
    pub cache: CacheStatus,
    /// The step resumed from, if any.
    pub resumed_from: Option<usize>,
}

/// Reads a split and its reference log-probabilities (cached in
/// `<output_dir>/reference/<name>/`), telling the observer what it read.
fn load_split(
    config: &TrainConfig,
    path: &Path,
    split: &str,
    name: &str,
    tokenizer: &TextTokenizer,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<(UnpairedData, UnpairedSplit, CacheStatus), TrainError> {
    let data = read_unpaired(path, split, tokenizer, config.max_length, config.batch_size)?;
    let mut notes = vec![format!("{} desirable, {} undesirable", data.desirable, data.undesirable)];
    if data.from_pairs {
        notes.push("unpaired from preference pairs (chosen desirable, rejected undesirable)".into());
    }
    if data.dropped > 0 {
        notes.push(format!("{} dropped (prompt reaches max_length)", data.dropped));
    }
    if data.truncated > 0 {
        notes.push(format!("{} truncated to max_length", data.truncated));
    }
    observer.warn(&format!("{}: {} examples: {}", path.display(), data.examples.len(), notes.join("; ")));
    let pairs: Vec<PreferencePair> = data.examples.iter().map(as_pair).collect();
    let settings = format!("kto max_length={} chunk={}", config.max_length, config.batch_size);
    let (reference, status) = reference::cached(config, &pairs, &settings, name, device)?;
    crate::dpo::report_cache(config, name, Some(&status), observer);
    Ok((data.clone(), UnpairedSplit { examples: data.examples, reference }, status))
}

/// Runs KTO as `config` says, writing the run folder; with `resume`, from
/// the last complete checkpoint.
pub fn train_kto(
    config: &TrainConfig,
    device: &Device,
    resume: bool,
    observer: &mut dyn Observer,
    stop_after: Option<usize>,
) -> Result<KtoSummary, TrainError> {
    if config.kto_loss_type == KtoLossType::Kto && config.batch_size < 2 {
        return Err(TrainError::Msg(
            "per_device_train_batch_size must be at least 2 for loss_type kto: z₀ is estimated from the batch's mismatched pairs".into(),
        ));
    }
    let checkpoint = check_run(config, resume)?;
    let config = &fit_to_context(config, false, observer)?;
    let tokenizer = TextTokenizer::load(&config.model)?;
    let (train_data, train, cache) = load_split(
        config,
        &config.train_file,
        &config.dataset_train_split,
        "train",
        &tokenizer,
        device,
        observer,
    )?;
    if let Some(w) = balance_warning(
        train_data.desirable,
        train_data.undesirable,
        config.desirable_weight,
        config.undesirable_weight,
    ) {
        observer.warn(&w);
    }
    let eval = match &config.eval_file {
        Some(path) => {
            load_split(config, path, &config.dataset_test_split, "eval", &tokenizer, device, observer)?.1
        }
        None => UnpairedSplit::default(),
    };
    let source = checkpoint.as_ref().map_or(config.model.clone(), |(_, dir)| dir.clone());
    let (model, weights) = CausalLm::load(&source, DType::F32, device)?;
    let objective = KtoObjective {
        model: &model,
        loss: KtoLossConfig {
            loss_type: config.kto_loss_type,
            beta: config.beta,
            desirable_weight: config.desirable_weight,
            undesirable_weight: config.undesirable_weight,
        },
        train: &train,
        eval: &eval,
        pad_id: tokenizer.pad_id(),
        batching: config.batching,
        device: device.clone(),
    };
    let mut trainer = Trainer::new(config, &weights, &config.model, train.examples.len())?;
    begin_run(config, resume)?;
    if let Some((_, dir)) = &checkpoint {
        trainer.resume_from(dir)?;
    }
    let outcome = trainer.run(&objective, observer, stop_after)?;
    Ok(KtoSummary { outcome, train_data, cache, resumed_from: checkpoint.map(|(s, _)| s) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss against its definition, written out per example in f64,
    /// for both loss types and unequal weights; its gradient in the policy
    /// log-probs against central finite differences. z₀ is a number, so no
    /// gradient can reach the mismatched pairs through it.
    #[test]
    fn loss_matches_its_definition_and_finite_differences() {
        let policy = [-3.2f64, -7.5, -1.1, -4.0];
        let reference = [-3.0f64, -6.0, -2.0, -4.4];
        let labels = [true, false, true, false];
        let sigma = |x: f64| 1.0 / (1.0 + (-x).exp());
        for (loss_type, kl) in
            [(KtoLossType::Kto, 0.7), (KtoLossType::ApoZeroUnpaired, 0.7), (KtoLossType::Kto, 0.0)]
        {
            let cfg = KtoLossConfig { loss_type, beta: 0.5, desirable_weight: 1.0, undesirable_weight: 1.5 };
            let z0 = if loss_type == KtoLossType::Kto { kl } else { 0.0 };
            let expected = |p: &[f64]| -> f64 {
                (0..4)
                    .map(|i| {
                        let r = p[i] - reference[i];
                        if labels[i] {
                            1.0 * (1.0 - sigma(cfg.beta * (r - z0)))
                        } else {
                            1.5 * (1.0 - sigma(cfg.beta * (z0 - r)))
                        }
                    })
                    .sum::<f64>()
                    / 4.0
            };
            let var = candle_core::Var::from_vec(policy.map(|x| x as f32).to_vec(), 4, &Device::Cpu).unwrap();
            let reference_t =
                Tensor::from_vec(reference.map(|x| x as f32).to_vec(), 4, &Device::Cpu).unwrap();
            let out = kto_loss(&cfg, var.as_tensor(), &reference_t, &labels, kl).unwrap();
            let got = out.loss.to_scalar::<f32>().unwrap() as f64;
            assert!((got - expected(&policy)).abs() < 1e-6, "{loss_type:?}: {got} vs {}", expected(&policy));
            let grad = out.loss.backward().unwrap().get(var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            for i in 0..4 {
                let h = 1e-5;
                let (mut up, mut down) = (policy, policy);
                up[i] += h;
                down[i] -= h;
                let fd = (expected(&up) - expected(&down)) / (2.0 * h);
                assert!((grad[i] as f64 - fd).abs() < 1e-5, "{loss_type:?} d/dp{i}: {} vs {fd}", grad[i]);
            }
        }
        // z₀ is the clamped mean gap of the mismatched pairs.
        assert_eq!(reference_point(&[-5.0, -7.0], &[-6.0, -8.0]), 1.0);
        assert_eq!(reference_point(&[-7.0], &[-6.0]), 0.0);
    }

    /// TRL's advice, with the ranges its warning prints (checked against
    /// TRL 1.16 on 5:3 and 4:3 data in tests/fixtures/trl_kto).
    #[test]
    fn class_balance_warning_follows_trl() {
        let w = balance_warning(5, 3, 1.0, 1.0).unwrap();
        assert!(w.contains("desirable_weight in [0.6, 0.8] or undesirable_weight in [1.25, 1.67]"), "{w}");
        assert!(balance_warning(5, 3, 1.0, 1.5).is_none());
        assert!(balance_warning(4, 3, 1.0, 1.0).is_none());
        let w = balance_warning(4, 3, 1.0, 1.5).unwrap();
        assert!(w.contains("[1.12, 1.5]") && w.contains("[1, 1.33]"), "{w}");
        assert!(balance_warning(3, 3, 1.0, 9.0).is_none());
    }
}
