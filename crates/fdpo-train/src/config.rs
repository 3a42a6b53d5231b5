//! f-DPO training configuration: a TOML file whose keys are TRL's DPOConfig
//! names (the file struct, unknown keys refused with the closest valid
//! name), validated into the struct the trainer uses, errors by field.
//!
//! `f_alpha_divergence_coef` is the paper's α (Wang et al. 2024): α → 0 is
//! reverse KL, α = 1 forward KL. TRL's coefficient is 1 − this α.
//! `f_divergence_type` takes TRL's names (`reverse_kl`, `forward_kl`,
//! `js_divergence`, `alpha_divergence`) and fdpo's (`chi-po`, `alpha:0.3`, ...).

use std::path::{Path, PathBuf};

use fdpo_core::loss::LossType;
use fdpo_core::Divergence;
use serde::{Deserialize, Serialize};

use crate::data::Truncation;
use crate::schedule::ScheduleKind;

/// The TOML file, exactly: every key optional, unknown keys refused.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainFile {
    /// Policy model directory (also the reference unless `ref_model`).
    pub model: Option<PathBuf>,
    /// Reference model directory.
    pub ref_model: Option<PathBuf>,
    /// Preference JSONL for training.
    pub train_file: Option<PathBuf>,
    /// Preference JSONL for evaluation.
    pub eval_file: Option<PathBuf>,
    /// Run folder.
    pub output_dir: Option<PathBuf>,
    /// β.
    pub beta: Option<f64>,
    /// sigmoid, hinge, ipo or robust.
    pub loss_type: Option<String>,
    /// The f-divergence.
    pub f_divergence_type: Option<String>,
    /// The paper's α for `alpha_divergence`.
    pub f_alpha_divergence_coef: Option<f64>,
    /// ε of sigmoid/robust.
    pub label_smoothing: Option<f64>,
    /// Ignore the reference model.
    pub reference_free: Option<bool>,
    /// Weight of an SFT term on the chosen response (TRL's `rpo_alpha`).
    #[serde(alias = "rpo_alpha")]
    pub sft_weight: Option<f64>,
    /// Peak learning rate.
    pub learning_rate: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Pairs per device per step.
    pub per_device_train_batch_size: Option<usize>,
    /// Pairs per evaluation batch.
    pub per_device_eval_batch_size: Option<usize>,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: Option<usize>,
    /// Epochs (ignored when `max_steps` is set).
    pub num_train_epochs: Option<f64>,
    /// Optimiser steps (overrides epochs).
    pub max_steps: Option<usize>,
    /// prompt + response tokens at most.
    pub max_length: Option<usize>,
    /// prompt tokens at most.
    pub max_prompt_length: Option<usize>,
    /// keep_end, keep_start or drop.
    pub truncation_mode: Option<String>,
    /// Share of steps for warmup.
    pub warmup_ratio: Option<f64>,
    /// Warmup steps (overrides the ratio).
    pub warmup_steps: Option<usize>,
    /// constant, constant_with_warmup, linear or cosine.
    pub lr_scheduler_type: Option<String>,
    /// Gradient clipping norm.
    pub max_grad_norm: Option<f64>,
    /// Seed of initialisation, shuffling and sampling.
    pub seed: Option<u64>,
    /// Log every N steps.
    pub logging_steps: Option<usize>,
    /// Evaluate every N steps.
    pub eval_steps: Option<usize>,
    /// Checkpoint every N steps.
    pub save_steps: Option<usize>,
    /// Keep only the last N checkpoints (older ones are deleted).
    pub save_total_limit: Option<usize>,
    /// Start a new run in an `output_dir` that holds an earlier one, deleting
    /// its checkpoints, `final/`, metrics and configuration.
    pub overwrite_output_dir: Option<bool>,
    /// Stop (with a checkpoint) after this many non-finite steps in a row.
    pub max_nonfinite_steps: Option<usize>,
    /// SFT: loss on completion tokens only (true) or on every token.
    pub completion_only_loss: Option<bool>,
    /// The command that started the run (`dpo`, `sft`, `reward`), so that
    /// `--resume` continues it with the same trainer; fdpo writes it.
    pub trainer: Option<String>,
}

/// The validated configuration (defaults filled in).
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
    /// Prompt limit.
    pub max_prompt_length: usize,
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
    /// TOML syntax, a wrong type or an unknown key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with the closest valid key for an unknown one.
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

/// The keys a file may have (for suggestions).
pub const KEYS: &[&str] = &[
    "model",
    "ref_model",
    "train_file",
    "eval_file",
    "output_dir",
    "beta",
    "loss_type",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "label_smoothing",
    "reference_free",
    "sft_weight",
    "learning_rate",
    "weight_decay",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "max_length",
    "max_prompt_length",
    "truncation_mode",
    "warmup_ratio",
    "warmup_steps",
    "lr_scheduler_type",
    "max_grad_norm",
    "seed",
    "logging_steps",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "overwrite_output_dir",
    "rpo_alpha",
    "max_nonfinite_steps",
    "completion_only_loss",
    "trainer",
];

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// What fdpo does instead of a TRL / transformers option it does not take,
/// so that the error explains rather than suggesting a near spelling.
fn trl_note(key: &str) -> Option<&'static str> {
    Some(match key {
        "max_completion_length" | "max_target_length" => {
            "fdpo limits prompt + response with `max_length` and the prompt with `max_prompt_length`"
        }
        "bf16" | "fp16" | "tf32" | "torch_dtype" => "training runs in f32",
        "save_strategy" | "eval_strategy" | "evaluation_strategy" | "logging_strategy" => {
            "fdpo works in steps: `save_steps`, `eval_steps` (with an `eval_file`), `logging_steps`"
        }
        "optim" | "adam_beta1" | "adam_beta2" | "adam_epsilon" => {
            "the optimiser is AdamW with β1 0.9, β2 0.999, ε 1e-8; `learning_rate` and `weight_decay` set the rest"
        }
        "report_to" | "run_name" | "logging_dir" => "metrics go to `output_dir`/metrics.jsonl",
        "precompute_ref_log_probs" => "the reference log-probabilities are always computed once and cached",
        "use_peft" | "peft_config" | "model_adapter_name" | "ref_adapter_name" | "lora_r" => {
            "fdpo trains every weight (no PEFT/LoRA)"
        }
        "gradient_checkpointing" | "dataset_num_proc" | "dataloader_num_workers" | "generate_during_eval" => {
            "not used by fdpo"
        }
        _ => return None,
    })
}

/// The valid key closest to `key`.
pub fn closest_key(key: &str) -> &'static str {
    KEYS.iter().min_by_key(|k| edit_distance(key, k)).copied().unwrap_or("beta")
}

impl TrainFile {
    /// Reads a TOML file.
    pub fn read(path: &Path) -> Result<TrainFile, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<TrainFile, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let mut message = e.message().to_string();
            if let Some(rest) = message.strip_prefix("unknown field `") {
                let key = rest.split('`').next().unwrap_or("");
                message = match trl_note(key) {
                    Some(note) => format!("unknown key `{key}`: {note}"),
                    None => format!("unknown key `{key}`; did you mean `{}`?", closest_key(key)),
                };
            }
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            ConfigError::Parse { path: path.into(), message: format!("{at}{message}") }
        })
    }

    /// Checks every value and fills in the defaults.
    pub fn validate(self, path: &Path) -> Result<TrainConfig, ConfigError> {
        let err =
            |field: &'static str, message: String| ConfigError::Field { path: path.into(), field, message };
        let positive = |field: &'static str, x: f64| {
            if x.is_finite() && x > 0.0 {
                Ok(x)
            } else {
                Err(err(field, format!("must be > 0, got {x}")))
            }
        };
        let at_least_one = |field: &'static str, n: usize| {
            if n >= 1 {
                Ok(n)
            } else {
                Err(err(field, "must be at least 1, got 0".into()))
            }
        };
        let non_negative = |field: &'static str, x: f64| {
            if x.is_finite() && x >= 0.0 {
                Ok(x)
            } else {
                Err(err(field, format!("must be >= 0, got {x}")))
            }
        };
        let model = self.model.ok_or_else(|| err("model", "missing".into()))?;
        let divergence_name = self.f_divergence_type.as_deref().unwrap_or("reverse_kl");
        if let Some(coef) = self.f_alpha_divergence_coef {
            // The coefficient belongs to `alpha_divergence`; `alpha:<a>` names
            // its own α, and the other divergences have none.
            if divergence_name != "alpha_divergence" {
                return Err(err(
                    "f_alpha_divergence_coef",
                    format!("{coef} given, but f_divergence_type `{divergence_name}` takes no coefficient (use `alpha_divergence`, or give α once as `alpha:{coef}`)"),
                ));
            }
        }
        let divergence = match divergence_name {
            "reverse_kl" => Divergence::ReverseKl,
            "forward_kl" => Divergence::ForwardKl,
            "js_divergence" => Divergence::JensenShannon,
            "alpha_divergence" => {
                let alpha = self.f_alpha_divergence_coef.unwrap_or(0.5);
                Divergence::alpha(alpha).map_err(|e| err("f_alpha_divergence_coef", e.to_string()))?
            }
            other => other
                .parse()
                .map_err(|e: fdpo_core::DivergenceError| err("f_divergence_type", e.to_string()))?,
        };
        let label_smoothing = self.label_smoothing.unwrap_or(0.0);
        if !(0.0..0.5).contains(&label_smoothing) {
            return Err(err("label_smoothing", format!("must be in [0, 0.5), got {label_smoothing}")));
        }
        let max_length = at_least_one("max_length", self.max_length.unwrap_or(1024))?;
        let max_prompt_length = at_least_one("max_prompt_length", self.max_prompt_length.unwrap_or(512))?;
        if max_prompt_length >= max_length {
            return Err(err(
                "max_prompt_length",
                format!("must be below max_length ({max_length}), got {max_prompt_length}"),
            ));
        }
        let warmup_ratio = self.warmup_ratio.unwrap_or(0.0);
        if !(0.0..1.0).contains(&warmup_ratio) {
            return Err(err("warmup_ratio", format!("must be in [0, 1), got {warmup_ratio}")));
        }
        let batch_size =
            at_least_one("per_device_train_batch_size", self.per_device_train_batch_size.unwrap_or(8))?;
        Ok(TrainConfig {
            ref_model: self.ref_model.unwrap_or_else(|| model.clone()),
            model,
            train_file: self.train_file.ok_or_else(|| err("train_file", "missing".into()))?,
            eval_file: self.eval_file,
            output_dir: self.output_dir.unwrap_or_else(|| PathBuf::from("runs/dpo")),
            divergence,
            loss_type: self
                .loss_type
                .as_deref()
                .unwrap_or("sigmoid")
                .parse()
                .map_err(|e: String| err("loss_type", e))?,
            beta: positive("beta", self.beta.unwrap_or(0.1))?,
            label_smoothing,
            reference_free: self.reference_free.unwrap_or(false),
            sft_weight: non_negative("sft_weight", self.sft_weight.unwrap_or(0.0))?,
            learning_rate: positive("learning_rate", self.learning_rate.unwrap_or(1e-6))?,
            weight_decay: non_negative("weight_decay", self.weight_decay.unwrap_or(0.0))?,
            batch_size,
            eval_batch_size: at_least_one(
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size.unwrap_or(batch_size),
            )?,
            gradient_accumulation_steps: at_least_one(
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps.unwrap_or(1),
            )?,
            num_train_epochs: positive("num_train_epochs", self.num_train_epochs.unwrap_or(3.0))?,
            max_steps: self.max_steps.map(|n| at_least_one("max_steps", n)).transpose()?,
            max_length,
            max_prompt_length,
            truncation: self
                .truncation_mode
                .as_deref()
                .unwrap_or("keep_end")
                .parse()
                .map_err(|e: String| err("truncation_mode", e))?,
            warmup_ratio,
            warmup_steps: self.warmup_steps,
            schedule: self
                .lr_scheduler_type
                .as_deref()
                .unwrap_or("linear")
                .parse()
                .map_err(|e: String| err("lr_scheduler_type", e))?,
            max_grad_norm: match self.max_grad_norm {
                None => Some(1.0),
                Some(0.0) => None,
                Some(x) if x.is_finite() && x > 0.0 => Some(x),
                Some(x) => {
                    return Err(err("max_grad_norm", format!("must be > 0, or 0 for no clipping, got {x}")))
                }
            },
            seed: self.seed.unwrap_or(42),
            logging_steps: at_least_one("logging_steps", self.logging_steps.unwrap_or(10))?,
            eval_steps: self.eval_steps.map(|n| at_least_one("eval_steps", n)).transpose()?,
            save_steps: at_least_one("save_steps", self.save_steps.unwrap_or(500))?,
            save_total_limit: self
                .save_total_limit
                .map(|n| at_least_one("save_total_limit", n))
                .transpose()?,
            overwrite_output_dir: self.overwrite_output_dir.unwrap_or(false),
            max_nonfinite_steps: at_least_one("max_nonfinite_steps", self.max_nonfinite_steps.unwrap_or(5))?,
            completion_only_loss: self.completion_only_loss.unwrap_or(true),
            trainer: match self.trainer {
                Some(t) if !["dpo", "sft", "reward"].contains(&t.as_str()) => {
                    return Err(err("trainer", format!("`{t}`: expected dpo, sft or reward")))
                }
                t => t,
            },
        })
    }
}

impl TrainConfig {
    /// The configuration as a file with every key set (the run folder's
    /// resolved `config.toml`; reading it back gives this configuration).
    pub fn to_file(&self) -> TrainFile {
        let (f_divergence_type, f_alpha_divergence_coef) = match self.divergence {
            Divergence::ReverseKl => ("reverse_kl".to_string(), None),
            Divergence::ForwardKl => ("forward_kl".to_string(), None),
            Divergence::JensenShannon => ("js_divergence".to_string(), None),
            Divergence::Alpha { alpha } => ("alpha_divergence".to_string(), Some(alpha)),
            Divergence::ChiPo => ("chi-po".to_string(), None),
        };
        let mut file = TrainFile {
            model: Some(self.model.clone()),
            ref_model: Some(self.ref_model.clone()),
            train_file: Some(self.train_file.clone()),
            eval_file: self.eval_file.clone(),
            output_dir: Some(self.output_dir.clone()),
            beta: Some(self.beta),
            loss_type: Some(self.loss_type.to_string()),
            f_divergence_type: Some(f_divergence_type),
            f_alpha_divergence_coef,
            label_smoothing: Some(self.label_smoothing),
            reference_free: Some(self.reference_free),
            sft_weight: Some(self.sft_weight),
            learning_rate: Some(self.learning_rate),
            weight_decay: Some(self.weight_decay),
            per_device_train_batch_size: Some(self.batch_size),
            per_device_eval_batch_size: Some(self.eval_batch_size),
            gradient_accumulation_steps: Some(self.gradient_accumulation_steps),
            num_train_epochs: Some(self.num_train_epochs),
            max_steps: self.max_steps,
            max_length: Some(self.max_length),
            max_prompt_length: Some(self.max_prompt_length),
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
            completion_only_loss: Some(self.completion_only_loss),
            trainer: self.trainer.clone(),
        };
        // Only the recorded trainer's keys, so that the file is a valid
        // --config for the same command.
        let trainer = self.trainer.as_deref();
        if matches!(trainer, Some("sft" | "reward")) {
            (file.ref_model, file.beta, file.loss_type, file.f_divergence_type) = (None, None, None, None);
            (file.f_alpha_divergence_coef, file.label_smoothing) = (None, None);
            (file.reference_free, file.sft_weight) = (None, None);
        }
        if matches!(trainer, Some("dpo" | "reward")) {
            file.completion_only_loss = None;
        }
        file
    }

    /// The resolved configuration as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_file()).expect("a flat struct of plain values")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TrainConfig, ConfigError> {
        let path = Path::new("run.toml");
        TrainFile::parse(text, path)?.validate(path)
    }

    const MINIMAL: &str = "model = \"m\"\ntrain_file = \"prefs.jsonl\"\n";

    #[test]
    fn trl_names_and_defaults() {
        let c = parse(&format!(
            "{MINIMAL}beta = 0.3\nf_divergence_type = \"alpha_divergence\"\nf_alpha_divergence_coef = 0.3\n\
             loss_type = \"ipo\"\nlr_scheduler_type = \"cosine\"\nmax_grad_norm = 0\n"
        ))
        .unwrap();
        assert_eq!(c.divergence, Divergence::Alpha { alpha: 0.3 });
        assert_eq!(
            (c.loss_type, c.beta, c.schedule, c.max_grad_norm),
            (LossType::Ipo, 0.3, ScheduleKind::Cosine, None)
        );
        assert_eq!(c.ref_model, PathBuf::from("m"));
        // TRL's rpo_alpha is the weight of the chosen response's NLL.
        assert_eq!(parse(&format!("{MINIMAL}rpo_alpha = 0.5\n")).unwrap().sft_weight, 0.5);
        let d = parse(MINIMAL).unwrap();
        assert_eq!((d.divergence, d.beta, d.truncation), (Divergence::ReverseKl, 0.1, Truncation::KeepEnd));
        assert_eq!(
            parse(&format!("{MINIMAL}f_divergence_type = \"chi-po\"\n")).unwrap().divergence,
            Divergence::ChiPo
        );
    }

    #[test]
    fn unknown_key_suggests_the_closest() {
        let e = parse(&format!("{MINIMAL}learning_rte = 1e-5\n")).unwrap_err().to_string();
        assert!(
            e.contains("run.toml: line 3: unknown key `learning_rte`; did you mean `learning_rate`?"),
            "{e}"
        );
        assert_eq!(closest_key("gradient_accumulation"), "gradient_accumulation_steps");
        // TRL names fdpo does not take are explained, not misspelt.
        let e = parse(&format!("{MINIMAL}max_completion_length = 128\n")).unwrap_err().to_string();
        assert!(
            e.contains(
                "unknown key `max_completion_length`: fdpo limits prompt + response with `max_length`"
            ),
            "{e}"
        );
        let e = parse(&format!("{MINIMAL}bf16 = true\n")).unwrap_err().to_string();
        assert!(e.contains("unknown key `bf16`: training runs in f32"), "{e}");
        assert_eq!(closest_key("warmup_step"), "warmup_steps");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("beta = 0", "run.toml: field `beta`: must be > 0, got 0"),
            ("f_divergence_type = \"tv\"", "field `f_divergence_type`: `tv` is not admissible"),
            (
                "f_divergence_type = \"alpha_divergence\"\nf_alpha_divergence_coef = 1.0",
                "field `f_alpha_divergence_coef`",
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
            (
                "f_divergence_type = \"js_divergence\"\nf_alpha_divergence_coef = 0.7",
                "field `f_alpha_divergence_coef`",
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
        assert!(e.starts_with("run.toml: line 3:"), "{e}");
    }

    #[test]
    fn resolved_toml_reads_back_to_the_same_configuration() {
        // overwrite_output_dir is an action, never recorded.
        let c = parse(&format!("{MINIMAL}overwrite_output_dir = true\n")).unwrap();
        assert!(c.overwrite_output_dir && !c.to_toml().contains("overwrite_output_dir"));
        for extra in ["", "f_divergence_type = \"alpha:0.3\"\nmax_grad_norm = 0\nlr_scheduler_type = \"cosine\"\n",
            "f_divergence_type = \"chi-po\"\nmax_steps = 7\ntruncation_mode = \"drop\"\neval_file = \"e.jsonl\"\n",
            "save_total_limit = 2\nrpo_alpha = 0.25\ntrainer = \"dpo\"\n",
            "trainer = \"sft\"\ncompletion_only_loss = false\n"] {
            let c = parse(&format!("{MINIMAL}{extra}")).unwrap();
            let again = parse(&c.to_toml()).unwrap();
            assert_eq!(again, c, "{}", c.to_toml());
            // Each trainer's file holds only its own keys.
            let text = c.to_toml();
            assert_eq!(text.contains("beta ="), c.trainer.as_deref() != Some("sft"), "{text}");
            assert_eq!(text.contains("completion_only_loss"), c.trainer.as_deref() != Some("dpo"), "{text}");
        }
    }
}
