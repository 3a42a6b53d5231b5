//! Training configuration: one definition per trainer, which is at once the
//! file schema and the command-line flags (as TRL's `DPOConfig` dataclass is
//! its YAML schema, its CLI and its documentation), validated into the
//! [`TrainConfig`] the trainers use, errors by field.
//!
//! [`CommonKeys`] are every trainer's (TRL's `TrainingArguments` and the
//! data keys); [`DpoKeys`], [`SftKeys`] and [`RewardKeys`] are each
//! trainer's own; [`Keys<S>`] puts them together. A key is written once:
//! the field's `#[arg(long)]` makes the flag and its `///` the help, serde
//! reads it from the file. A key of another trainer is refused naming that
//! trainer; an unknown key gets the closest valid name.
//!
//! Files: fdpo's TOML, or the YAML of TRL's own command line (`trl dpo
//! --config dpo.yaml`: `model_name_or_path`, `dataset_name` as a local path
//! or snapshot folder, `dataset_train_split`, `output_dir` and the
//! `DPOConfig` keys) — chosen by the extension `.yaml`/`.yml`. TRL keys that
//! fdpo does not act on are explained: ignored with a warning where they
//! leave the objective unchanged (`bf16`, `report_to`, ...), refused where
//! they would change it (`use_weighting = true`, `ld_alpha`, ...).
//!
//! `f_alpha_divergence_coef` means what it means in TRL: the coefficient c
//! of `alpha_divergence`, whose f'(t) = (t^(c−1) − 1)/(c − 1), i.e. the
//! paper's α (Wang et al. 2024; α → 0 is reverse KL, α = 1 forward KL) is
//! 1 − c. The paper's α itself is written `f_divergence_type = "alpha:0.3"`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, FromArgMatches};
use fdpo_core::loss::LossType;
use fdpo_core::Divergence;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::data::Truncation;
use crate::schedule::ScheduleKind;
use fdpo_model::packing::Batching;

/// TRL's default `f_alpha_divergence_coef`, which its saved configs carry
/// beside every divergence.
pub const TRL_DEFAULT_ALPHA_COEF: f64 = 0.5;

/// Keys every trainer takes.
#[derive(Debug, Clone, Default, PartialEq, Args, Deserialize, Serialize)]
pub struct CommonKeys {
    /// Policy model directory, Hugging Face layout (TRL: model_name_or_path).
    #[arg(long)]
    #[serde(alias = "model_name_or_path")]
    pub model: Option<PathBuf>,
    /// Training data: a .jsonl, a .parquet or a dataset folder (TRL: dataset_name, a local path).
    #[arg(long, visible_alias = "data")]
    #[serde(alias = "dataset_name", alias = "data")]
    pub train_file: Option<PathBuf>,
    /// Evaluation data: a .jsonl, a .parquet or a dataset folder.
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    /// The split of a dataset folder to train on (default train; e.g. train_prefs).
    #[arg(long, visible_alias = "split")]
    #[serde(alias = "split")]
    pub dataset_train_split: Option<String>,
    /// The split of a dataset folder to evaluate on (default test).
    #[arg(long)]
    pub dataset_test_split: Option<String>,
    /// Run folder.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub learning_rate: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Examples (pairs) per micro-batch.
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Examples per evaluation batch.
    #[arg(long)]
    pub per_device_eval_batch_size: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Epochs (ignored when max_steps is set).
    #[arg(long, allow_negative_numbers = true)]
    pub num_train_epochs: Option<f64>,
    /// Optimiser steps (overrides epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Prompt + response tokens at most.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Prompt tokens at most (older TRL's key; TRL 1.16 limits only max_length).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// keep_start (TRL's default: responses cut at the end, a pair whose prompt fills
    /// max_length dropped), keep_end (the prompt loses its start) or drop.
    #[arg(long)]
    pub truncation_mode: Option<String>,
    /// Share of steps for linear warmup.
    #[arg(long, allow_negative_numbers = true)]
    pub warmup_ratio: Option<f64>,
    /// Warmup steps (overrides the ratio).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// constant, constant_with_warmup, linear or cosine.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    /// Gradient clipping norm (0: none).
    #[arg(long, allow_negative_numbers = true)]
    pub max_grad_norm: Option<f64>,
    /// Seed of initialisation, data order and sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Log every N steps.
    #[arg(long)]
    pub logging_steps: Option<usize>,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Checkpoint every N steps.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Start over in an output_dir that holds an earlier run (its
    /// checkpoints, final model, metrics and config are deleted).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite_output_dir: Option<bool>,
    /// Stop with a checkpoint after this many non-finite steps in a row.
    #[arg(long)]
    pub max_nonfinite_steps: Option<usize>,
    /// Pack each micro-batch's sequences end to end without padding, each
    /// attending only to itself (TRL's padding_free; default true: the loss
    /// is the same, the padding's work is not done).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub padding_free: Option<bool>,
    /// With padding_free, compute a pair's prompt once for chosen and
    /// rejected (f-DPO, reward model, reference pass; default true: the
    /// rejected response sees the prompt, not the chosen one).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub prefix_sharing: Option<bool>,
    /// The command that started the run (dpo, sft, reward), so that
    /// --resume continues it with the same trainer; fdpo writes it.
    #[arg(skip)]
    pub trainer: Option<String>,
}

/// f-DPO's own keys (`fdpo train`), with TRL's `DPOConfig` names.
#[derive(Debug, Clone, Default, PartialEq, Args, Deserialize, Serialize)]
pub struct DpoKeys {
    /// Reference model directory (default: the policy's).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// β.
    #[arg(long, allow_negative_numbers = true)]
    pub beta: Option<f64>,
    /// sigmoid, hinge, ipo or robust (a TRL list of one is accepted).
    #[arg(long)]
    pub loss_type: Option<LossTypeKey>,
    /// reverse_kl, forward_kl, js_divergence, alpha_divergence, chi-po, or the paper's alpha:0.3.
    #[arg(long)]
    pub f_divergence_type: Option<String>,
    /// TRL's coefficient c of alpha_divergence: the paper's α = 1 − c (c = 0.3 is α = 0.7).
    #[arg(long, allow_negative_numbers = true)]
    pub f_alpha_divergence_coef: Option<f64>,
    /// Label smoothing ε (sigmoid, robust).
    #[arg(long, allow_negative_numbers = true)]
    pub label_smoothing: Option<f64>,
    /// Ignore the reference model.
    #[arg(long)]
    pub reference_free: Option<bool>,
    /// Weight of an SFT term on the chosen response (TRL's rpo_alpha).
    #[arg(long, visible_alias = "rpo-alpha", allow_negative_numbers = true)]
    #[serde(alias = "rpo_alpha")]
    pub sft_weight: Option<f64>,
}

/// SFT's own keys (`fdpo sft`), with TRL's `SFTConfig` names.
#[derive(Debug, Clone, Default, PartialEq, Args, Deserialize, Serialize)]
pub struct SftKeys {
    /// Loss on completion tokens only (default true).
    #[arg(long)]
    pub completion_only_loss: Option<bool>,
}

/// The reward model's own keys (`fdpo reward train`): none beyond the common ones.
#[derive(Debug, Clone, Default, PartialEq, Args, Deserialize, Serialize)]
pub struct RewardKeys {}

/// KTO's own keys (`fdpo kto`), with TRL's `KTOConfig` names.
#[derive(Debug, Clone, Default, PartialEq, Args, Deserialize, Serialize)]
pub struct KtoKeys {
    /// Reference model directory (default: the policy's).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// β.
    #[arg(long, allow_negative_numbers = true)]
    pub beta: Option<f64>,
    /// kto or apo_zero_unpaired.
    #[arg(long)]
    pub loss_type: Option<LossTypeKey>,
    /// Weight of the desirable examples' losses (default 1).
    #[arg(long, allow_negative_numbers = true)]
    pub desirable_weight: Option<f64>,
    /// Weight of the undesirable examples' losses (default 1).
    #[arg(long, allow_negative_numbers = true)]
    pub undesirable_weight: Option<f64>,
}

/// KTO's loss (TRL's `KTOConfig.loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KtoLossType {
    /// 1 − σ(β(r − z₀)) for desirable, 1 − σ(β(z₀ − r)) for undesirable.
    Kto,
    /// APO-zero without pairs: 1 − σ(β r) for desirable, σ(β r) for undesirable.
    ApoZeroUnpaired,
}

impl std::str::FromStr for KtoLossType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kto" => Ok(KtoLossType::Kto),
            "apo_zero_unpaired" => Ok(KtoLossType::ApoZeroUnpaired),
            other => Err(format!("unknown KTO loss_type `{other}` (kto, apo_zero_unpaired)")),
        }
    }
}

impl std::fmt::Display for KtoLossType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KtoLossType::Kto => "kto",
            KtoLossType::ApoZeroUnpaired => "apo_zero_unpaired",
        })
    }
}

impl OwnKeys for KtoKeys {
    const TRAINER: &'static str = "kto";
    const COMMAND: &'static str = "fdpo kto";

    fn apply(self, c: &mut TrainConfig, err: &FieldError) -> Result<(), ConfigError> {
        c.kto_loss_type = match self.loss_type {
            None => KtoLossType::Kto,
            Some(key) => key.parse(err)?,
        };
        // TRL 1.16's KTOConfig limits prompt + completion with max_length,
        // keeping the start; fdpo kto reads no other limit.
        if let Some(m) = c.max_prompt_length {
            return Err(err.at("max_prompt_length", format!("{m}: not a key of KTO (fdpo kto, like TRL's KTOConfig, limits prompt + completion with max_length)")));
        }
        if c.truncation != crate::data::Truncation::KeepStart {
            return Err(err.at(
                "truncation_mode",
                "KTO keeps the start of each sequence (keep_start), as TRL's KTOTrainer".into(),
            ));
        }
        c.beta = positive(err, "beta", self.beta.unwrap_or(0.1))?;
        c.desirable_weight = positive(err, "desirable_weight", self.desirable_weight.unwrap_or(1.0))?;
        c.undesirable_weight = positive(err, "undesirable_weight", self.undesirable_weight.unwrap_or(1.0))?;
        if let Some(r) = self.ref_model {
            c.ref_model = r;
        }
        Ok(())
    }

    fn from_config(c: &TrainConfig) -> Self {
        KtoKeys {
            ref_model: Some(c.ref_model.clone()),
            beta: Some(c.beta),
            loss_type: Some(LossTypeKey::One(c.kto_loss_type.to_string())),
            desirable_weight: Some(c.desirable_weight),
            undesirable_weight: Some(c.undesirable_weight),
        }
    }
}

/// `loss_type` as TRL writes it: a name, or a list of names (TRL ≥ 0.20
/// combines several with `loss_weights`; fdpo trains one).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum LossTypeKey {
    /// One loss.
    One(String),
    /// TRL's list form.
    List(Vec<String>),
}

impl LossTypeKey {
    /// The one loss named (TRL's list of one included), parsed as `T`.
    fn parse<T: std::str::FromStr<Err = String>>(self, err: &FieldError) -> Result<T, ConfigError> {
        let name = match self {
            LossTypeKey::One(s) => s,
            LossTypeKey::List(list) if list.len() == 1 => list.into_iter().next().expect("one element"),
            LossTypeKey::List(list) => {
                return Err(err.at(
                    "loss_type",
                    format!("{list:?}: fdpo trains one loss_type (TRL's weighted list with loss_weights is not supported); give one (and rpo_alpha for an SFT term under fdpo train)"),
                ))
            }
        };
        name.parse().map_err(|e: String| err.at("loss_type", e))
    }
}

impl std::str::FromStr for LossTypeKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(LossTypeKey::One(s.into()))
    }
}

/// A trainer's own keys: which trainer they belong to, and how they enter
/// the validated configuration.
pub trait OwnKeys:
    Args + FromArgMatches + Serialize + DeserializeOwned + Default + Clone + PartialEq + std::fmt::Debug
{
    /// The name recorded as `trainer` in config.toml.
    const TRAINER: &'static str;
    /// The command that runs it.
    const COMMAND: &'static str;
    /// Validates these keys into `config` (whose common keys are set).
    fn apply(self, config: &mut TrainConfig, err: &FieldError) -> Result<(), ConfigError>;
    /// The keys that reproduce `config`.
    fn from_config(config: &TrainConfig) -> Self;
    /// Warnings these keys deserve even when valid.
    fn warnings(&self) -> Vec<String> {
        vec![]
    }
}

/// Builds field errors for one file.
pub struct FieldError(PathBuf);

impl FieldError {
    /// An error on `field`.
    pub fn at(&self, field: &'static str, message: String) -> ConfigError {
        ConfigError::Field { path: self.0.clone(), field, message }
    }
}

impl OwnKeys for DpoKeys {
    const TRAINER: &'static str = "dpo";
    const COMMAND: &'static str = "fdpo train";

    fn apply(self, c: &mut TrainConfig, err: &FieldError) -> Result<(), ConfigError> {
        let name = self.f_divergence_type.as_deref().unwrap_or("reverse_kl");
        c.divergence = match name {
            "reverse_kl" => Divergence::ReverseKl,
            "forward_kl" => Divergence::ForwardKl,
            "js_divergence" => Divergence::JensenShannon,
            "alpha_divergence" => {
                let coef = self.f_alpha_divergence_coef.unwrap_or(TRL_DEFAULT_ALPHA_COEF);
                Divergence::alpha(1.0 - coef).map_err(|e| {
                    err.at(
                        "f_alpha_divergence_coef",
                        format!(
                            "{coef} is TRL's coefficient, the paper's α = 1 − {coef} = {}: {e}",
                            1.0 - coef
                        ),
                    )
                })?
            }
            other => other
                .parse()
                .map_err(|e: fdpo_core::DivergenceError| err.at("f_divergence_type", e.to_string()))?,
        };
        if let Some(coef) = self.f_alpha_divergence_coef {
            // TRL's configs carry its default coefficient beside every
            // divergence (see `warnings`); any other value beside a
            // divergence that takes none is a mistake.
            if name != "alpha_divergence" && coef != TRL_DEFAULT_ALPHA_COEF {
                return Err(err.at(
                    "f_alpha_divergence_coef",
                    format!("{coef} given, but f_divergence_type `{name}` takes no coefficient (use `alpha_divergence`, whose coefficient c is the paper's α = 1 − c, or the paper's α as `alpha:<α>`)"),
                ));
            }
        }
        c.loss_type = match self.loss_type {
            None => LossType::Sigmoid,
            Some(key) => key.parse(err)?,
        };
        c.beta = positive(err, "beta", self.beta.unwrap_or(0.1))?;
        let label_smoothing = self.label_smoothing.unwrap_or(0.0);
        if !(0.0..0.5).contains(&label_smoothing) {
            return Err(err.at("label_smoothing", format!("must be in [0, 0.5), got {label_smoothing}")));
        }
        c.label_smoothing = label_smoothing;
        c.reference_free = self.reference_free.unwrap_or(false);
        c.sft_weight = non_negative(err, "sft_weight", self.sft_weight.unwrap_or(0.0))?;
        if let Some(r) = self.ref_model {
            c.ref_model = r;
        }
        Ok(())
    }

    fn from_config(c: &TrainConfig) -> Self {
        let f_divergence_type = match c.divergence {
            Divergence::ReverseKl => "reverse_kl".to_string(),
            Divergence::ForwardKl => "forward_kl".to_string(),
            Divergence::JensenShannon => "js_divergence".to_string(),
            // The paper's α, which needs no coefficient beside it.
            other => other.name(),
        };
        DpoKeys {
            ref_model: Some(c.ref_model.clone()),
            beta: Some(c.beta),
            loss_type: Some(LossTypeKey::One(c.loss_type.to_string())),
            f_divergence_type: Some(f_divergence_type),
            f_alpha_divergence_coef: None,
            label_smoothing: Some(c.label_smoothing),
            reference_free: Some(c.reference_free),
            sft_weight: Some(c.sft_weight),
        }
    }

    fn warnings(&self) -> Vec<String> {
        let name = self.f_divergence_type.as_deref().unwrap_or("reverse_kl");
        match self.f_alpha_divergence_coef {
            Some(c) if c == TRL_DEFAULT_ALPHA_COEF && name != "alpha_divergence" => vec![format!(
                "`f_alpha_divergence_coef` = {c} (TRL's default, which its configs carry) ignored: f_divergence_type `{name}` takes no coefficient"
            )],
            _ => vec![],
        }
    }
}

impl OwnKeys for SftKeys {
    const TRAINER: &'static str = "sft";
    const COMMAND: &'static str = "fdpo sft";

    fn apply(self, c: &mut TrainConfig, err: &FieldError) -> Result<(), ConfigError> {
        // TRL's SFTConfig keeps the start of each sequence up to max_length.
        if let Some(m) = c.max_prompt_length {
            return Err(err.at(
                "max_prompt_length",
                format!("{m}: not a key of SFT (fdpo sft, like TRL's SFTConfig, keeps the first max_length tokens)"),
            ));
        }
        if c.truncation != crate::data::Truncation::KeepStart {
            return Err(err.at(
                "truncation_mode",
                "SFT keeps the start of each sequence (keep_start), as TRL's SFTTrainer".into(),
            ));
        }
        c.completion_only_loss = self.completion_only_loss.unwrap_or(true);
        Ok(())
    }

    fn from_config(c: &TrainConfig) -> Self {
        SftKeys { completion_only_loss: Some(c.completion_only_loss) }
    }
}

impl OwnKeys for RewardKeys {
    const TRAINER: &'static str = "reward";
    const COMMAND: &'static str = "fdpo reward train";

    fn apply(self, _: &mut TrainConfig, _: &FieldError) -> Result<(), ConfigError> {
        Ok(())
    }

    fn from_config(_: &TrainConfig) -> Self {
        RewardKeys {}
    }
}

/// A trainer's whole configuration: the common keys and its own. The
/// file, and the flags (flags given on the command line win).
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct Keys<S: OwnKeys> {
    /// Every trainer's keys.
    #[command(flatten)]
    pub common: CommonKeys,
    /// This trainer's keys.
    #[command(flatten)]
    pub own: S,
}

/// `fdpo train`'s configuration.
pub type DpoFile = Keys<DpoKeys>;
/// `fdpo sft`'s configuration.
pub type SftFile = Keys<SftKeys>;
/// `fdpo reward train`'s configuration.
pub type RewardFile = Keys<RewardKeys>;
/// `fdpo kto`'s configuration.
pub type KtoFile = Keys<KtoKeys>;

/// The validated configuration (defaults filled in), which every trainer reads.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Policy model directory.
    pub model: PathBuf,
    /// Reference model directory.
    pub ref_model: PathBuf,
    /// Training data.
    pub train_file: PathBuf,
    /// Evaluation data.
    pub eval_file: Option<PathBuf>,
    /// Split of `train_file` when it is a dataset folder.
    pub dataset_train_split: String,
    /// Split of `eval_file` when it is a dataset folder.
    pub dataset_test_split: String,
    /// Run folder.
    pub output_dir: PathBuf,
    /// The f-divergence.
    pub divergence: Divergence,
    /// The loss.
    pub loss_type: LossType,
    /// β.
    pub beta: f64,
    /// ε.
    pub label_smoothing: f64,
    /// Ignore the reference.
    pub reference_free: bool,
    /// SFT weight.
    pub sft_weight: f64,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Pairs per evaluation batch.
    pub eval_batch_size: usize,
    /// Micro-batches per step.
    pub gradient_accumulation_steps: usize,
    /// Epochs.
    pub num_train_epochs: f64,
    /// Steps, when fixed.
    pub max_steps: Option<usize>,
    /// Token limits.
    pub max_length: usize,
    /// Prompt limit, when set.
    pub max_prompt_length: Option<usize>,
    /// Truncation.
    pub truncation: Truncation,
    /// Warmup ratio (used when `warmup_steps` is None).
    pub warmup_ratio: f64,
    /// Warmup steps.
    pub warmup_steps: Option<usize>,
    /// Decay.
    pub schedule: ScheduleKind,
    /// Clipping norm (None: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Seed.
    pub seed: u64,
    /// Logging period.
    pub logging_steps: usize,
    /// Evaluation period.
    pub eval_steps: Option<usize>,
    /// Checkpoint period.
    pub save_steps: usize,
    /// Checkpoints kept (None: all).
    pub save_total_limit: Option<usize>,
    /// Replace an earlier run in `output_dir`.
    pub overwrite_output_dir: bool,
    /// Non-finite steps in a row that stop the run.
    pub max_nonfinite_steps: usize,
    /// SFT: loss on completion tokens only.
    pub completion_only_loss: bool,
    /// KTO: the loss.
    pub kto_loss_type: KtoLossType,
    /// KTO: weight of desirable examples.
    pub desirable_weight: f64,
    /// KTO: weight of undesirable examples.
    pub undesirable_weight: f64,
    /// How micro-batches are laid out (padding_free, prefix_sharing).
    pub batching: Batching,
    /// The command that started the run, when recorded.
    pub trainer: Option<String>,
}

/// A configuration error, naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Reading the file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Syntax, a wrong type or an unknown key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where known.
        message: String,
    },
    /// A value out of range or missing.
    #[error("{path}: field `{field}`: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The key.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn positive(err: &FieldError, field: &'static str, x: f64) -> Result<f64, ConfigError> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(err.at(field, format!("must be > 0, got {x}")))
    }
}

fn non_negative(err: &FieldError, field: &'static str, x: f64) -> Result<f64, ConfigError> {
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(err.at(field, format!("must be >= 0, got {x}")))
    }
}

fn at_least_one(err: &FieldError, field: &'static str, n: usize) -> Result<usize, ConfigError> {
    if n >= 1 {
        Ok(n)
    } else {
        Err(err.at(field, "must be at least 1, got 0".into()))
    }
}

/// The file keys of `A` (clap's argument ids, which are the field names,
/// and their aliases), as written in a file.
fn keys_of<A: Args>() -> Vec<String> {
    let cmd = A::augment_args(clap::Command::new("keys"));
    let mut keys = Vec::new();
    for arg in cmd.get_arguments() {
        keys.push(arg.get_id().to_string());
        for alias in arg.get_all_aliases().into_iter().flatten() {
            keys.push(alias.replace('-', "_"));
        }
    }
    keys
}

/// The command whose own key `key` is (`beta` → `fdpo train`), if any.
pub fn command_of_key(key: &str) -> Option<&'static str> {
    [
        (keys_of::<DpoKeys>(), DpoKeys::COMMAND),
        (keys_of::<SftKeys>(), SftKeys::COMMAND),
        (keys_of::<RewardKeys>(), RewardKeys::COMMAND),
        (keys_of::<KtoKeys>(), KtoKeys::COMMAND),
    ]
    .into_iter()
    .find(|(keys, _)| keys.iter().any(|k| k == key))
    .map(|(_, command)| command)
}

/// Aliases serde reads that are not flag aliases (TRL's CLI names).
const FILE_ALIASES: &[&str] = &["model_name_or_path", "dataset_name", "trainer"];

/// What fdpo does with a TRL / transformers key it does not take: `Ok`
/// (ignored, with this warning) where the objective is unchanged, `Err`
/// (refused, with this reason) where it would change.
fn trl_key(key: &str, value: &toml::Value) -> Option<Result<String, String>> {
    let truthy = matches!(value, toml::Value::Boolean(true));
    let set = !matches!(value, toml::Value::Boolean(false));
    let ignored = |note: &str| Some(Ok(format!("`{key}` ignored: {note}")));
    let refused = |note: &str| Some(Err(format!("`{key}`: {note}")));
    match key {
        "bf16" | "fp16" | "tf32" | "torch_dtype" | "dtype" | "bf16_full_eval" | "fp16_full_eval" => {
            if truthy || matches!(key, "torch_dtype" | "dtype") {
                ignored("fdpo trains in f32 (f32 master weights; use --dtype to run other commands in bf16)")
            } else {
                Some(Ok(String::new()))
            }
        }
        "gradient_checkpointing" | "gradient_checkpointing_kwargs" => {
            if set {
                ignored("activations are kept (no recomputation); results are the same")
            } else {
                Some(Ok(String::new()))
            }
        }
        "precompute_ref_log_probs" | "precompute_ref_batch_size" => {
            Some(Ok(String::new())) // fdpo always computes the reference log-probs once and caches them.
        }
        "padding_value" | "pad_token" | "pad_to_multiple_of" => {
            ignored("fdpo's batches never let padding into a product or the loss, whatever the pad id")
        }
        "report_to" | "run_name" | "logging_dir" | "logging_first_step" | "disable_tqdm" | "log_level" => {
            ignored("metrics go to output_dir/metrics.jsonl")
        }
        "save_strategy" | "eval_strategy" | "evaluation_strategy" | "logging_strategy" | "do_train" | "do_eval"
        | "generate_during_eval" | "save_only_model" | "load_best_model_at_end" => {
            ignored("fdpo works in steps: save_steps, eval_steps (with an eval_file), logging_steps")
        }
        "push_to_hub" | "hub_model_id" | "hub_strategy" | "hub_private_repo" => {
            ignored("fdpo uploads nothing; the model is in output_dir/final")
        }
        "dataloader_num_workers" | "dataloader_pin_memory" | "dataset_num_proc" | "attn_implementation"
        | "trust_remote_code" | "model_revision" | "dataset_config" | "dataset_streaming" | "use_liger_kernel"
        | "disable_dropout" | "remove_unused_columns" | "ddp_find_unused_parameters" => {
            ignored("not used by fdpo (dropout is always off in training)")
        }
        "max_completion_length" => ignored(
            "not a key of TRL 1.16 either: prompt + response is limited by max_length (and the prompt by max_prompt_length, when set)",
        ),
        "optim" => match value.as_str() {
            Some("adamw_torch" | "adamw_torch_fused" | "adamw_hf") => Some(Ok(String::new())),
            _ => refused("the optimiser is AdamW (adamw_torch)"),
        },
        "adam_beta1" | "adam_beta2" | "adam_epsilon" => {
            let default = match key {
                "adam_beta1" => 0.9,
                "adam_beta2" => 0.999,
                _ => 1e-8,
            };
            match value.as_float().or(value.as_integer().map(|i| i as f64)) {
                Some(x) if x == default => Some(Ok(String::new())),
                _ => refused(&format!("fdpo's AdamW uses β1 0.9, β2 0.999, ε 1e-8; {key} = {default} only")),
            }
        }
        "use_weighting" => {
            if truthy {
                refused("WPO weighting is not supported")
            } else {
                Some(Ok(String::new()))
            }
        }
        "ld_alpha" => refused("LD-DPO's length desensitisation is not supported"),
        "loss_weights" => refused("fdpo trains one loss_type; weights of several are not supported"),
        "use_peft" => {
            if truthy {
                refused("fdpo trains every weight (no PEFT/LoRA)")
            } else {
                Some(Ok(String::new()))
            }
        }
        "lora_r" | "lora_alpha" | "lora_dropout" | "lora_target_modules" | "lora_task_type" | "peft_config"
        | "model_adapter_name" | "ref_adapter_name" => {
            ignored("fdpo trains every weight; PEFT settings apply only with use_peft = true, which is refused")
        }
        "assistant_only_loss" => {
            if truthy {
                refused("not supported: a `messages` example learns every token, as TRL's default")
            } else {
                Some(Ok(String::new()))
            }
        }
        "packing" | "packing_strategy" => ignored(
            "fdpo packs each micro-batch without padding (padding_free, default true), never across examples",
        ),
        "dataset_text_field" => match value.as_str() {
            Some("text") => Some(Ok(String::new())),
            _ => refused("fdpo reads language-modelling text from the `text` field"),
        },
        "sync_ref_model" => {
            if truthy {
                refused("the reference is fixed (TR-DPO's reference updates are not supported)")
            } else {
                Some(Ok(String::new()))
            }
        }
        "ref_model_mixup_alpha" | "ref_model_sync_steps" => {
            ignored("the reference is fixed; these apply only with sync_ref_model = true, which is refused")
        }
        _ => None,
    }
}

/// The valid key closest to `key` (Jaro–Winkler similarity).
pub fn closest_key<'a>(key: &str, keys: &'a [String]) -> &'a str {
    keys.iter()
        .max_by(|a, b| strsim::jaro_winkler(key, a).total_cmp(&strsim::jaro_winkler(key, b)))
        .map_or("beta", String::as_str)
}

/// The line of `key` in TOML or YAML `text` (for messages), if found.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with(['=', ':']))
        })
        .map(|i| i + 1)
}

/// Whether `path` is a YAML file (TRL's CLI configs).
fn is_yaml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// The keys of a file as a TOML table: TOML as written, YAML with its
/// nulls dropped (a null key is an unset one).
fn table_of(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    let parse = |message: String| ConfigError::Parse { path: path.into(), message };
    if is_yaml(path) {
        let value: serde_json::Value =
            serde_saphyr::from_str(text).map_err(|e| parse(format!("invalid YAML: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(parse("expected a mapping of keys to values".into()));
        };
        let mut table = toml::Table::new();
        for (k, v) in map {
            if v.is_null() {
                continue;
            }
            let value = toml::Value::try_from(&v).map_err(|e| parse(format!("key `{k}`: {e}")))?;
            table.insert(k, value);
        }
        Ok(table)
    } else {
        text.parse::<toml::Table>().map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            parse(format!("{at}{}", e.message()))
        })
    }
}

impl<S: OwnKeys> Keys<S> {
    /// Reads a TOML or (by extension) YAML file; also returns the warnings
    /// it deserves (TRL keys that fdpo ignores).
    pub fn read(path: &Path) -> Result<(Self, Vec<String>), ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses file text; `path` names the file in messages and decides the format.
    pub fn parse(text: &str, path: &Path) -> Result<(Self, Vec<String>), ConfigError> {
        let parse_err = |key: &str, message: String| {
            let at = line_of(text, key).map(|l| format!("line {l}: ")).unwrap_or_default();
            ConfigError::Parse { path: path.into(), message: format!("{at}{message}") }
        };
        let mut table = table_of(text, path)?;
        let own: Vec<String> = keys_of::<Self>();
        let mut warnings = Vec::new();
        for (key, value) in table.clone() {
            if own.contains(&key) || FILE_ALIASES.contains(&key.as_str()) {
                continue;
            }
            match trl_key(&key, &value) {
                Some(Ok(note)) => {
                    warnings.extend((!note.is_empty()).then_some(note));
                    table.remove(&key);
                    continue;
                }
                Some(Err(reason)) => return Err(parse_err(&key, reason)),
                None => {}
            }
            return Err(match command_of_key(&key) {
                Some(command) => parse_err(
                    &key,
                    format!("`{key}` does not apply to `{}` (it is an option of `{command}`)", S::COMMAND),
                ),
                None => parse_err(
                    &key,
                    format!("unknown key `{key}`; did you mean `{}`?", closest_key(&key, &own)),
                ),
            });
        }
        let value = toml::Value::Table(table);
        let typed = |e: serde_path_to_error::Error<toml::de::Error>| {
            let key = e.path().to_string();
            parse_err(&key, format!("field `{key}`: {}", e.into_inner().message()))
        };
        let common: CommonKeys = serde_path_to_error::deserialize(value.clone()).map_err(typed)?;
        let own: S = serde_path_to_error::deserialize(value).map_err(typed)?;
        if let Some(t) = common.trainer.as_deref().filter(|t| *t != S::TRAINER) {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!(
                    "`trainer = {t:?}` is for another command; `{}` records its own",
                    S::COMMAND
                ),
            });
        }
        warnings.extend(own.warnings());
        Ok((Keys { common, own }, warnings))
    }

    /// These keys with every key set in `flags` laid over them. A value
    /// TOML cannot hold (an integer above 2⁶³ − 1) is an error.
    pub fn overlay(self, flags: Self) -> Result<Self, ConfigError> {
        let fail = |e: &dyn std::fmt::Display| ConfigError::Parse {
            path: PathBuf::from("(command line)"),
            message: format!("a value out of range: {e}"),
        };
        let table = |k: &Self| -> Result<toml::Table, ConfigError> {
            let mut t = toml::Table::try_from(&k.common).map_err(|e| fail(&e))?;
            t.extend(toml::Table::try_from(&k.own).map_err(|e| fail(&e))?);
            Ok(t)
        };
        let mut merged = table(&self)?;
        merged.extend(table(&flags)?);
        let merged = toml::Value::Table(merged);
        Ok(Keys {
            common: merged.clone().try_into().map_err(|e| fail(&e))?,
            own: merged.try_into().map_err(|e| fail(&e))?,
        })
    }

    /// Whether any key is set.
    pub fn any(&self) -> bool {
        *self != Self::default()
    }

    /// Checks every value and fills in the defaults.
    pub fn validate(self, path: &Path) -> Result<TrainConfig, ConfigError> {
        let err = FieldError(path.into());
        let f = self.common;
        let model = f.model.ok_or_else(|| err.at("model", "missing".into()))?;
        let max_length = at_least_one(&err, "max_length", f.max_length.unwrap_or(1024))?;
        let max_prompt_length =
            f.max_prompt_length.map(|m| at_least_one(&err, "max_prompt_length", m)).transpose()?;
        if let Some(m) = max_prompt_length.filter(|&m| m >= max_length) {
            return Err(
                err.at("max_prompt_length", format!("must be below max_length ({max_length}), got {m}"))
            );
        }
        let warmup_ratio = f.warmup_ratio.unwrap_or(0.0);
        if !(0.0..1.0).contains(&warmup_ratio) {
            return Err(err.at("warmup_ratio", format!("must be in [0, 1), got {warmup_ratio}")));
        }
        let batch_size =
            at_least_one(&err, "per_device_train_batch_size", f.per_device_train_batch_size.unwrap_or(8))?;
        let mut config = TrainConfig {
            ref_model: model.clone(),
            model,
            train_file: f.train_file.ok_or_else(|| err.at("train_file", "missing".into()))?,
            eval_file: f.eval_file,
            dataset_train_split: f.dataset_train_split.unwrap_or_else(|| "train".into()),
            dataset_test_split: f.dataset_test_split.unwrap_or_else(|| "test".into()),
            output_dir: f.output_dir.unwrap_or_else(|| PathBuf::from(format!("runs/{}", S::TRAINER))),
            divergence: Divergence::ReverseKl,
            loss_type: LossType::Sigmoid,
            beta: 0.1,
            label_smoothing: 0.0,
            reference_free: false,
            sft_weight: 0.0,
            learning_rate: positive(&err, "learning_rate", f.learning_rate.unwrap_or(1e-6))?,
            weight_decay: non_negative(&err, "weight_decay", f.weight_decay.unwrap_or(0.0))?,
            batch_size,
            eval_batch_size: at_least_one(
                &err,
                "per_device_eval_batch_size",
                f.per_device_eval_batch_size.unwrap_or(batch_size),
            )?,
            gradient_accumulation_steps: at_least_one(
                &err,
                "gradient_accumulation_steps",
                f.gradient_accumulation_steps.unwrap_or(1),
            )?,
            num_train_epochs: positive(&err, "num_train_epochs", f.num_train_epochs.unwrap_or(3.0))?,
            max_steps: f.max_steps.map(|n| at_least_one(&err, "max_steps", n)).transpose()?,
            max_length,
            max_prompt_length,
            truncation: f
                .truncation_mode
                .as_deref()
                .unwrap_or("keep_start")
                .parse()
                .map_err(|e: String| err.at("truncation_mode", e))?,
            warmup_ratio,
            warmup_steps: f.warmup_steps,
            schedule: f
                .lr_scheduler_type
                .as_deref()
                .unwrap_or("linear")
                .parse()
                .map_err(|e: String| err.at("lr_scheduler_type", e))?,
            max_grad_norm: match f.max_grad_norm {
                None => Some(1.0),
                Some(0.0) => None,
                Some(x) if x.is_finite() && x > 0.0 => Some(x),
                Some(x) => {
                    return Err(err.at("max_grad_norm", format!("must be > 0, or 0 for no clipping, got {x}")))
                }
            },
            seed: f.seed.unwrap_or(42),
            logging_steps: at_least_one(&err, "logging_steps", f.logging_steps.unwrap_or(10))?,
            eval_steps: f.eval_steps.map(|n| at_least_one(&err, "eval_steps", n)).transpose()?,
            save_steps: at_least_one(&err, "save_steps", f.save_steps.unwrap_or(500))?,
            save_total_limit: f
                .save_total_limit
                .map(|n| at_least_one(&err, "save_total_limit", n))
                .transpose()?,
            overwrite_output_dir: f.overwrite_output_dir.unwrap_or(false),
            max_nonfinite_steps: at_least_one(
                &err,
                "max_nonfinite_steps",
                f.max_nonfinite_steps.unwrap_or(5),
            )?,
            completion_only_loss: true,
            kto_loss_type: KtoLossType::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            batching: Batching {
                padding_free: f.padding_free.unwrap_or(true),
                prefix_sharing: f.prefix_sharing.unwrap_or(true),
            },
            trainer: Some(S::TRAINER.into()),
        };
        self.own.apply(&mut config, &err)?;
        Ok(config)
    }
}

impl TrainConfig {
    /// The keys of this configuration's trainer with every key set (the run
    /// folder's resolved `config.toml`; reading it back gives this
    /// configuration).
    pub fn to_keys<S: OwnKeys>(&self) -> Keys<S> {
        let common = CommonKeys {
            model: Some(self.model.clone()),
            train_file: Some(self.train_file.clone()),
            eval_file: self.eval_file.clone(),
            dataset_train_split: Some(self.dataset_train_split.clone()),
            dataset_test_split: Some(self.dataset_test_split.clone()),
            output_dir: Some(self.output_dir.clone()),
            learning_rate: Some(self.learning_rate),
            weight_decay: Some(self.weight_decay),
            per_device_train_batch_size: Some(self.batch_size),
            per_device_eval_batch_size: Some(self.eval_batch_size),
            gradient_accumulation_steps: Some(self.gradient_accumulation_steps),
            num_train_epochs: Some(self.num_train_epochs),
            max_steps: self.max_steps,
            max_length: Some(self.max_length),
            max_prompt_length: self.max_prompt_length,
            truncation_mode: Some(
                match self.truncation {
                    Truncation::KeepEnd => "keep_end",
                    Truncation::KeepStart => "keep_start",
                    Truncation::Drop => "drop",
                }
                .into(),
            ),
            warmup_ratio: Some(self.warmup_ratio),
            warmup_steps: self.warmup_steps,
            lr_scheduler_type: Some(
                match self.schedule {
                    ScheduleKind::Constant => "constant_with_warmup",
                    ScheduleKind::Linear => "linear",
                    ScheduleKind::Cosine => "cosine",
                }
                .into(),
            ),
            max_grad_norm: Some(self.max_grad_norm.unwrap_or(0.0)),
            seed: Some(self.seed),
            logging_steps: Some(self.logging_steps),
            eval_steps: self.eval_steps,
            save_steps: Some(self.save_steps),
            save_total_limit: self.save_total_limit,
            // An action, not a setting: rerunning this file must not
            // delete the run it describes.
            overwrite_output_dir: None,
            max_nonfinite_steps: Some(self.max_nonfinite_steps),
            padding_free: Some(self.batching.padding_free),
            prefix_sharing: Some(self.batching.prefix_sharing),
            trainer: Some(S::TRAINER.into()),
        };
        Keys { common, own: S::from_config(self) }
    }

    /// The resolved configuration as TOML text, with its trainer's keys only.
    pub fn to_toml(&self) -> String {
        fn text<S: OwnKeys>(c: &TrainConfig) -> String {
            let keys = c.to_keys::<S>();
            let mut t = toml::Table::try_from(&keys.common).expect("plain values");
            t.extend(toml::Table::try_from(&keys.own).expect("plain values"));
            // Keys sorted as in the structs would need an ordered map; a
            // sorted file reads as well.
            let sorted: BTreeMap<_, _> = t.into_iter().collect();
            toml::to_string(&sorted).expect("a flat table of plain values")
        }
        match self.trainer.as_deref() {
            Some("sft") => text::<SftKeys>(self),
            Some("reward") => text::<RewardKeys>(self),
            Some("kto") => text::<KtoKeys>(self),
            _ => text::<DpoKeys>(self),
        }
    }

    /// Reads a run folder's `config.toml` with the keys of the trainer it
    /// records (f-DPO when it records none).
    pub fn read_run(path: &Path) -> Result<TrainConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse_run(&text, path)
    }

    /// [`TrainConfig::read_run`] on text.
    pub fn parse_run(text: &str, path: &Path) -> Result<TrainConfig, ConfigError> {
        let table = table_of(text, path)?;
        match table.get("trainer").and_then(toml::Value::as_str) {
            Some("sft") => SftFile::parse(text, path)?.0.validate(path),
            Some("reward") => RewardFile::parse(text, path)?.0.validate(path),
            Some("kto") => KtoFile::parse(text, path)?.0.validate(path),
            _ => DpoFile::parse(text, path)?.0.validate(path),
        }
    }
}

/// Parses `text` as `S`'s keys and validates it (for tests and built-in
/// runs, where warnings have no reader).
pub fn parse_config<S: OwnKeys>(text: &str, path: &Path) -> Result<TrainConfig, ConfigError> {
    Keys::<S>::parse(text, path)?.0.validate(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TrainConfig, ConfigError> {
        parse_config::<DpoKeys>(text, Path::new("run.toml"))
    }

    const MINIMAL: &str = "model = \"m\"\ntrain_file = \"prefs.jsonl\"\n";

    #[test]
    fn trl_names_and_defaults() {
        let c = parse(&format!(
            "{MINIMAL}beta = 0.3\nf_divergence_type = \"alpha_divergence\"\nf_alpha_divergence_coef = 0.3\n\
             loss_type = \"ipo\"\nlr_scheduler_type = \"cosine\"\nmax_grad_norm = 0\n"
        ))
        .unwrap();
        // TRL's coefficient 0.3 is the paper's α = 0.7.
        assert!(matches!(c.divergence, Divergence::Alpha { alpha } if (alpha - 0.7).abs() < 1e-15));
        assert_eq!(
            (c.loss_type, c.beta, c.schedule, c.max_grad_norm),
            (LossType::Ipo, 0.3, ScheduleKind::Cosine, None)
        );
        assert_eq!(c.ref_model, PathBuf::from("m"));
        // TRL's rpo_alpha is the weight of the chosen response's NLL.
        assert_eq!(parse(&format!("{MINIMAL}rpo_alpha = 0.5\n")).unwrap().sft_weight, 0.5);
        let d = parse(MINIMAL).unwrap();
        assert_eq!((d.divergence, d.beta, d.truncation), (Divergence::ReverseKl, 0.1, Truncation::KeepStart));
        assert_eq!(
            parse(&format!("{MINIMAL}f_divergence_type = \"chi-po\"\n")).unwrap().divergence,
            Divergence::ChiPo
        );
        // The paper's α is written as alpha:<α>.
        assert_eq!(
            parse(&format!("{MINIMAL}f_divergence_type = \"alpha:0.3\"\n")).unwrap().divergence,
            Divergence::Alpha { alpha: 0.3 }
        );
        // TRL's list form of one loss.
        assert_eq!(parse(&format!("{MINIMAL}loss_type = [\"hinge\"]\n")).unwrap().loss_type, LossType::Hinge);
    }

    /// TRL's saved configs carry f_alpha_divergence_coef = 0.5 beside every
    /// divergence: accepted with a warning; another value is refused.
    #[test]
    fn trl_default_coefficient_beside_another_divergence_is_a_warning() {
        let path = Path::new("run.toml");
        let (keys, warnings) = DpoFile::parse(
            &format!("{MINIMAL}f_divergence_type = \"reverse_kl\"\nf_alpha_divergence_coef = 0.5\n"),
            path,
        )
        .unwrap();
        assert_eq!(keys.validate(path).unwrap().divergence, Divergence::ReverseKl);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("`reverse_kl` takes no coefficient"), "{warnings:?}");
        let e = parse(&format!(
            "{MINIMAL}f_divergence_type = \"js_divergence\"\nf_alpha_divergence_coef = 0.7\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("field `f_alpha_divergence_coef`: 0.7 given, but f_divergence_type `js_divergence` takes no coefficient"), "{e}");
    }

    #[test]
    fn unknown_key_suggests_the_closest() {
        let e = parse(&format!("{MINIMAL}learning_rte = 1e-5\n")).unwrap_err().to_string();
        assert!(
            e.contains("run.toml: line 3: unknown key `learning_rte`; did you mean `learning_rate`?"),
            "{e}"
        );
        let keys = keys_of::<DpoFile>();
        assert_eq!(closest_key("gradient_accumulation", &keys), "gradient_accumulation_steps");
        assert_eq!(closest_key("warmup_step", &keys), "warmup_steps");
        // Another trainer's key names that trainer.
        let e = parse(&format!("{MINIMAL}completion_only_loss = true\n")).unwrap_err().to_string();
        assert!(
            e.contains(
                "`completion_only_loss` does not apply to `fdpo train` (it is an option of `fdpo sft`)"
            ),
            "{e}"
        );
        let e = parse_config::<SftKeys>(&format!("{MINIMAL}beta = 0.1\n"), Path::new("s.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`beta` does not apply to `fdpo sft` (it is an option of `fdpo train`)"), "{e}");
    }

    /// TRL keys fdpo does not act on: ignored with a warning where the
    /// objective is unchanged, refused where it would change.
    #[test]
    fn trl_keys_are_explained() {
        let path = Path::new("run.toml");
        let (_, warnings) = DpoFile::parse(
            &format!("{MINIMAL}bf16 = true\ngradient_checkpointing = true\nreport_to = \"none\"\nprecompute_ref_log_probs = true\nmax_completion_length = 64\n"),
            path,
        )
        .unwrap();
        let all = warnings.join("\n");
        for key in ["bf16", "gradient_checkpointing", "report_to", "max_completion_length"] {
            assert!(all.contains(&format!("`{key}` ignored")), "{key}: {all}");
        }
        assert!(!all.contains("precompute_ref_log_probs"), "always done: nothing to warn about");
        for (extra, want) in [
            ("use_weighting = true", "`use_weighting`: WPO weighting is not supported"),
            ("ld_alpha = 0.5", "`ld_alpha`: LD-DPO"),
            ("loss_type = [\"sigmoid\", \"sft\"]", "fdpo trains one loss_type"),
            ("use_peft = true", "no PEFT/LoRA"),
            ("optim = \"sgd\"", "the optimiser is AdamW"),
        ] {
            let e = parse(&format!("{MINIMAL}{extra}\n")).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        assert!(parse(&format!("{MINIMAL}use_weighting = false\nbf16 = false\n")).is_ok());
    }

    /// A TRL CLI recipe (`trl dpo --config dpo.yaml`) reads as the same
    /// configuration as the TOML with fdpo's names.
    #[test]
    fn trl_yaml_recipes_read_as_toml() {
        let yaml = "model_name_or_path: m\ndataset_name: prefs.jsonl\ndataset_train_split: train_prefs\n\
                    output_dir: out\nlearning_rate: 5.0e-7\nbeta: 0.05\nf_divergence_type: alpha_divergence\n\
                    f_alpha_divergence_coef: 0.3\nbf16: true\nreport_to: none\nlogging_steps: 25\n\
                    per_device_train_batch_size: 2\ngradient_checkpointing: true\nmax_length: 1024\n\
                    max_prompt_length: 512\nwarmup_ratio: 0.1\nlora_r: null\n";
        let (keys, warnings) = DpoFile::parse(yaml, Path::new("dpo.yaml")).unwrap();
        let c = keys.validate(Path::new("dpo.yaml")).unwrap();
        let toml = "model = \"m\"\ntrain_file = \"prefs.jsonl\"\ndataset_train_split = \"train_prefs\"\n\
                    output_dir = \"out\"\nlearning_rate = 5e-7\nbeta = 0.05\nf_divergence_type = \"alpha:0.7\"\n\
                    logging_steps = 25\nper_device_train_batch_size = 2\nmax_length = 1024\n\
                    max_prompt_length = 512\nwarmup_ratio = 0.1\n";
        let mut want = parse(toml).unwrap();
        // 1 − 0.3 in floating point is not 0.7 written out.
        want.divergence = Divergence::Alpha { alpha: 1.0 - 0.3 };
        assert_eq!(c, want);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        let e = DpoFile::parse("model_name_or_path: m\nbeta: [oops\n", Path::new("dpo.yaml")).unwrap_err();
        assert!(e.to_string().starts_with("dpo.yaml: invalid YAML"), "{e}");
        let e = DpoFile::parse("model_name_or_path: m\nbeta: high\n", Path::new("dpo.yaml")).unwrap_err();
        assert!(e.to_string().contains("dpo.yaml: line 2: field `beta`"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("beta = 0", "run.toml: field `beta`: must be > 0, got 0"),
            ("f_divergence_type = \"tv\"", "field `f_divergence_type`: `tv` is not admissible"),
            (
                "f_divergence_type = \"alpha_divergence\"\nf_alpha_divergence_coef = 1.0",
                "field `f_alpha_divergence_coef`: 1 is TRL's coefficient, the paper's α = 1 − 1 = 0",
            ),
            ("loss_type = \"nca_pair\"", "field `loss_type`: loss_type `nca_pair` is not supported"),
            (
                "max_length = 10\nmax_prompt_length = 20",
                "field `max_prompt_length`: must be below max_length",
            ),
            ("label_smoothing = 0.5", "field `label_smoothing`"),
            ("per_device_train_batch_size = 0", "field `per_device_train_batch_size`: must be at least 1"),
            ("sft_weight = -1", "field `sft_weight`: must be >= 0, got -1"),
            ("weight_decay = -0.1", "field `weight_decay`: must be >= 0, got -0.1"),
            ("save_total_limit = 0", "field `save_total_limit`: must be at least 1"),
            (
                "f_divergence_type = \"alpha:0.3\"\nf_alpha_divergence_coef = 0.7",
                "field `f_alpha_divergence_coef`: 0.7 given, but f_divergence_type `alpha:0.3` takes no coefficient",
            ),
            ("sft_weight = 1\nrpo_alpha = 1", "duplicate field `sft_weight`"),
        ];
        for (extra, want) in cases {
            let e = parse(&format!("{MINIMAL}{extra}\n")).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = parse("train_file = \"x\"\n").unwrap_err().to_string();
        assert_eq!(e, "run.toml: field `model`: missing");
        let e = parse(&format!("{MINIMAL}beta = \"high\"\n")).unwrap_err().to_string();
        assert!(e.starts_with("run.toml: line 3: field `beta`:"), "{e}");
    }

    /// Flag aliases are file keys too, and TRL's default values of keys
    /// fdpo refuses when set are accepted; SFT refuses limits it cannot use;
    /// a flag value TOML cannot hold is an error, not a panic.
    #[test]
    fn aliases_defaults_and_ranges() {
        let c = parse("model = \"m\"\ndata = \"d.parquet\"\nsplit = \"test_prefs\"\n").unwrap();
        assert_eq!(
            (c.train_file, c.dataset_train_split.as_str()),
            (PathBuf::from("d.parquet"), "test_prefs")
        );
        let (_, warnings) = DpoFile::parse(
            &format!("{MINIMAL}sync_ref_model = false\nuse_peft = false\nlora_r = 16\n"),
            Path::new("run.toml"),
        )
        .unwrap();
        assert!(warnings.iter().any(|w| w.contains("`lora_r` ignored")), "{warnings:?}");
        assert!(parse(&format!("{MINIMAL}sync_ref_model = true\n")).is_err());
        let sft = |extra: &str| parse_config::<SftKeys>(&format!("{MINIMAL}{extra}"), Path::new("s.toml"));
        assert!(sft("max_prompt_length = 8\n").unwrap_err().to_string().contains("not a key of SFT"));
        assert!(sft("truncation_mode = \"drop\"\n").unwrap_err().to_string().contains("keep_start"));
        let flags = DpoFile {
            common: CommonKeys { seed: Some(u64::MAX), ..Default::default() },
            ..Default::default()
        };
        let e = DpoFile::default().overlay(flags).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn kto_keys_and_limits() {
        let kto = |extra: &str| parse_config::<KtoKeys>(&format!("{MINIMAL}{extra}"), Path::new("kto.toml"));
        let c = kto("loss_type = \"apo_zero_unpaired\"\nundesirable_weight = 1.5\n").unwrap();
        assert_eq!(
            (c.kto_loss_type, c.desirable_weight, c.undesirable_weight),
            (KtoLossType::ApoZeroUnpaired, 1.0, 1.5)
        );
        assert_eq!(TrainConfig::parse_run(&c.to_toml(), Path::new("config.toml")).unwrap(), c);
        for (extra, want) in [
            ("max_prompt_length = 8\n", "field `max_prompt_length`: 8: not a key of KTO"),
            ("truncation_mode = \"keep_end\"\n", "field `truncation_mode`: KTO keeps the start"),
            ("loss_type = \"sigmoid\"\n", "unknown KTO loss_type `sigmoid`"),
            ("desirable_weight = 0\n", "field `desirable_weight`: must be > 0"),
            ("f_divergence_type = \"js_divergence\"\n", "`f_divergence_type` does not apply to `fdpo kto`"),
        ] {
            let e = kto(extra).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
    }

    #[test]
    fn resolved_toml_reads_back_to_the_same_configuration() {
        // overwrite_output_dir is an action, never recorded.
        let c = parse(&format!("{MINIMAL}overwrite_output_dir = true\n")).unwrap();
        assert!(c.overwrite_output_dir && !c.to_toml().contains("overwrite_output_dir"));
        let path = Path::new("config.toml");
        for extra in [
            "",
            "f_divergence_type = \"alpha:0.3\"\nmax_grad_norm = 0\nlr_scheduler_type = \"cosine\"\n",
            "f_divergence_type = \"alpha_divergence\"\nf_alpha_divergence_coef = 0.25\n",
            "f_divergence_type = \"chi-po\"\nmax_steps = 7\ntruncation_mode = \"drop\"\neval_file = \"e.jsonl\"\n",
            "save_total_limit = 2\nrpo_alpha = 0.25\ndataset_train_split = \"train_prefs\"\n",
        ] {
            let c = parse(&format!("{MINIMAL}{extra}")).unwrap();
            let again = TrainConfig::parse_run(&c.to_toml(), path).unwrap();
            assert_eq!(again, c, "{}", c.to_toml());
        }
        let sft = parse_config::<SftKeys>(&format!("{MINIMAL}completion_only_loss = false\n"), path).unwrap();
        let text = sft.to_toml();
        assert!(!text.contains("beta =") && text.contains("completion_only_loss = false"), "{text}");
        assert_eq!(TrainConfig::parse_run(&text, path).unwrap(), sft);
        let dpo_text = parse(MINIMAL).unwrap().to_toml();
        assert!(dpo_text.contains("beta =") && !dpo_text.contains("completion_only_loss"), "{dpo_text}");
    }
}
