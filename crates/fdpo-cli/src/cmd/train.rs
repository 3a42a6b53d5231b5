//! `fdpo train` (f-DPO) and `fdpo sft`: a TOML configuration with TRL's
//! names, every key also a flag (flags win over the file), a progress bar,
//! and `--resume RUN_DIR` continuing a run from its last complete checkpoint.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fdpo_train::config::{TrainConfig, TrainFile};
use fdpo_train::dpo::train_dpo;
use fdpo_train::sft::train_sft;
use fdpo_train::trainer::{Observer, Outcome};
use indicatif::ProgressBar;
use serde_json::{Map, Value};

use crate::output::progress;

/// Every configuration key as a flag (`--learning-rate` for `learning_rate`).
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigFlags {
    /// Policy model directory (Hugging Face layout).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Reference model directory (default: the policy's).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// Training JSONL.
    #[arg(long, visible_alias = "data")]
    pub train_file: Option<PathBuf>,
    /// Evaluation JSONL.
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    /// Run folder.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// β.
    #[arg(long, allow_negative_numbers = true)]
    pub beta: Option<f64>,
    /// sigmoid, hinge, ipo or robust.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// reverse_kl, forward_kl, js_divergence, alpha_divergence, chi-po (or alpha:0.3, ...).
    #[arg(long)]
    pub f_divergence_type: Option<String>,
    /// The paper's α of alpha_divergence (α → 0 reverse KL, α = 1 forward KL; TRL's is 1 − α).
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
    pub sft_weight: Option<f64>,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub learning_rate: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Examples per micro-batch.
    #[arg(long)]
    pub per_device_train_batch_size: Option<usize>,
    /// Examples per evaluation batch.
    #[arg(long)]
    pub per_device_eval_batch_size: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Epochs.
    #[arg(long, allow_negative_numbers = true)]
    pub num_train_epochs: Option<f64>,
    /// Optimiser steps (overrides epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Prompt + response tokens at most.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Prompt tokens at most.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// keep_end, keep_start or drop.
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
    /// Seed of the data order.
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
    /// SFT: loss on completion tokens only (default true).
    #[arg(long)]
    pub completion_only_loss: Option<bool>,
}

impl ConfigFlags {
    /// The file with every flag given laid over it.
    pub fn overlay(self, mut f: TrainFile) -> TrainFile {
        macro_rules! set {
            ($($k:ident),*) => { $( if self.$k.is_some() { f.$k = self.$k; } )* };
        }
        set!(
            model,
            ref_model,
            train_file,
            eval_file,
            output_dir,
            beta,
            loss_type,
            f_divergence_type,
            f_alpha_divergence_coef,
            label_smoothing,
            reference_free,
            sft_weight,
            learning_rate,
            weight_decay,
            per_device_train_batch_size,
            per_device_eval_batch_size,
            gradient_accumulation_steps,
            num_train_epochs,
            max_steps,
            max_length,
            max_prompt_length,
            truncation_mode,
            warmup_ratio,
            warmup_steps,
            lr_scheduler_type,
            max_grad_norm,
            seed,
            logging_steps,
            eval_steps,
            save_steps,
            save_total_limit,
            overwrite_output_dir,
            max_nonfinite_steps,
            completion_only_loss
        );
        f
    }

    fn any(&self) -> bool {
        self.clone().overlay(TrainFile::default()) != TrainFile::default()
    }
}

/// Arguments of `fdpo train` and `fdpo sft`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML configuration (TRL's DPOConfig/SFTConfig names); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in this folder from its last complete checkpoint
    /// (with the configuration saved there).
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Stop after this step as if killed (for testing --resume).
    #[arg(long, hide = true)]
    pub stop_after_steps: Option<usize>,
    #[command(flatten)]
    pub flags: ConfigFlags,
}

/// Which trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// f-DPO.
    Dpo,
    /// Supervised fine-tuning.
    Sft,
    /// Bradley–Terry reward model.
    Reward,
}

impl Mode {
    /// The name recorded as `trainer` in config.toml.
    fn key(self) -> &'static str {
        match self {
            Mode::Dpo => "dpo",
            Mode::Sft => "sft",
            Mode::Reward => "reward",
        }
    }

    fn from_key(key: &str) -> Option<Mode> {
        [Mode::Dpo, Mode::Sft, Mode::Reward].into_iter().find(|m| m.key() == key)
    }

    /// The command that runs this trainer.
    fn command(self) -> &'static str {
        match self {
            Mode::Dpo => "fdpo train",
            Mode::Sft => "fdpo sft",
            Mode::Reward => "fdpo reward train",
        }
    }
}

/// The progress bar and warnings on stderr.
pub struct Progress {
    bar: Option<ProgressBar>,
    what: &'static str,
}

impl Progress {
    /// A bar labelled `what`, drawn when training starts.
    pub fn new(what: &'static str) -> Self {
        Progress { bar: None, what }
    }
}

impl Progress {
    /// A line on stderr above the bar. indicatif drops `println` on a
    /// hidden bar (stderr not a terminal: CI, `2> log`), so then the line
    /// goes to stderr directly.
    fn say(&self, line: String) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(line),
            _ => eprintln!("{line}"),
        }
    }
}

impl Observer for Progress {
    fn start(&mut self, step: usize, total: usize) {
        let bar = progress(total, self.what);
        bar.set_position(step as u64);
        self.bar = Some(bar);
    }

    fn step(&mut self, _step: usize, loss: f64, tokens_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.4} · {tokens_per_s:.0} tokens/s"));
        }
    }

    fn log(&mut self, record: &Map<String, Value>) {
        if let (Some(_), Some(loss)) = (&self.bar, record.get("eval_loss")) {
            let acc = record
                .get("eval_rewards/accuracies")
                .map(|a| format!(", eval_rewards/accuracies {a}"))
                .or_else(|| record.get("eval_accuracy").map(|a| format!(", eval_accuracy {a}")));
            self.say(format!("step {}: eval_loss {loss}{}", record["step"], acc.unwrap_or_default()));
        }
    }

    fn warn(&mut self, message: &str) {
        self.say(format!("warning: {message}"));
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
            if !bar.is_hidden() {
                // indicatif leaves the cursor after the bar.
                eprintln!();
            }
        }
    }
}

/// The validated configuration of a new run or of the run being resumed.
fn resolve(args: &TrainArgs, mode: Mode) -> Result<TrainConfig> {
    if let Some(run) = &args.resume {
        if args.flags.any() {
            bail!("--resume continues {} with its saved config.toml; drop the other options", run.display());
        }
        let path = run.join("config.toml");
        let mut config = TrainFile::read(&path)?.validate(&path)?;
        if let Some(started) = config.trainer.as_deref().filter(|t| *t != mode.key()) {
            let command = Mode::from_key(started).map_or("fdpo train", Mode::command);
            bail!(
                "{}: this run was started by `{command}`; continue it with `{command} --resume {}`",
                path.display(),
                run.display()
            );
        }
        config.output_dir = run.clone();
        return Ok(config);
    }
    let (file, path) = match &args.config {
        Some(p) => (TrainFile::read(p)?, p.clone()),
        None => (TrainFile::default(), PathBuf::from("(command line)")),
    };
    let mut file = args.flags.clone().overlay(file);
    refuse_foreign_keys(&file, mode, &path)?;
    file.trainer = Some(mode.key().into());
    if file.output_dir.is_none() {
        file.output_dir = Some(PathBuf::from(match mode {
            Mode::Dpo => "runs/dpo",
            Mode::Sft => "runs/sft",
            Mode::Reward => "runs/reward",
        }));
    }
    let config = file.validate(&path)?;
    if let (Some(given), Ok(written)) = (&args.config, config.output_dir.join("config.toml").canonicalize()) {
        if given.canonicalize().is_ok_and(|g| g == written) {
            bail!(
                "{}: the run writes its resolved configuration here; keep yours elsewhere or choose another output_dir",
                given.display()
            );
        }
    }
    Ok(config)
}

/// Refuses keys of another trainer (e.g. `beta` for `fdpo sft`), which
/// would otherwise be recorded in config.toml and silently ignored.
fn refuse_foreign_keys(f: &TrainFile, mode: Mode, path: &std::path::Path) -> Result<()> {
    let dpo_only = [
        ("ref_model", f.ref_model.is_some()),
        ("beta", f.beta.is_some()),
        ("loss_type", f.loss_type.is_some()),
        ("f_divergence_type", f.f_divergence_type.is_some()),
        ("f_alpha_divergence_coef", f.f_alpha_divergence_coef.is_some()),
        ("label_smoothing", f.label_smoothing.is_some()),
        ("reference_free", f.reference_free.is_some()),
        ("sft_weight", f.sft_weight.is_some()),
    ];
    let sft_only = [("completion_only_loss", f.completion_only_loss.is_some())];
    let command = mode.command();
    let foreign: Vec<(&str, bool, &str)> = match mode {
        Mode::Dpo => sft_only.iter().map(|&(k, set)| (k, set, "fdpo sft")).collect(),
        Mode::Sft => dpo_only.iter().map(|&(k, set)| (k, set, "fdpo train")).collect(),
        Mode::Reward => dpo_only
            .iter()
            .map(|&(k, set)| (k, set, "fdpo train"))
            .chain(sft_only.iter().map(|&(k, set)| (k, set, "fdpo sft")))
            .collect(),
    };
    if let Some(t) = f.trainer.as_deref().filter(|t| *t != mode.key()) {
        bail!("{}: `trainer = {t:?}` is for another command; `{command}` records its own", path.display());
    }
    if let Some((key, _, owner)) = foreign.into_iter().find(|&(_, set, _)| set) {
        bail!("{}: `{key}` does not apply to `{command}` (it is an option of `{owner}`)", path.display());
    }
    Ok(())
}

/// Runs `fdpo train` or `fdpo sft`.
pub fn run(args: TrainArgs, mode: Mode) -> Result<()> {
    let config = resolve(&args, mode)?;
    let device = fdpo_model::device(&args.device)?;
    let resume = args.resume.is_some();
    let what = match mode {
        Mode::Dpo => "f-DPO",
        Mode::Sft => "SFT",
        Mode::Reward => "reward model",
    };
    let mut observer = Progress::new(what);
    let (outcome, resumed_from) = match mode {
        Mode::Dpo => {
            let s = train_dpo(&config, &device, resume, &mut observer, args.stop_after_steps)
                .with_context(|| format!("training {}", config.output_dir.display()))?;
            (s.outcome, s.resumed_from)
        }
        Mode::Reward => {
            let s = fdpo_train::reward::train_reward(
                &config,
                &device,
                resume,
                &mut observer,
                args.stop_after_steps,
            )
            .with_context(|| format!("training {}", config.output_dir.display()))?;
            (s.outcome, s.resumed_from)
        }
        Mode::Sft => {
            let s = train_sft(&config, &device, resume, &mut observer, args.stop_after_steps)
                .with_context(|| format!("training {}", config.output_dir.display()))?;
            (s.outcome, s.resumed_from)
        }
    };
    if let Some(step) = resumed_from {
        eprintln!("resumed from step {step}");
    }
    match outcome {
        Outcome::Finished { model_dir } => {
            eprintln!(
                "{what} done: model in {}, metrics in {}",
                model_dir.display(),
                config.output_dir.join("metrics.jsonl").display()
            )
        }
        Outcome::Stopped { step } => eprintln!("stopped after step {step}"),
    }
    Ok(())
}
