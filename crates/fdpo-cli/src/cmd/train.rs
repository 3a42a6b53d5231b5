//! `fdpo train` (f-DPO), `fdpo sft` and `fdpo reward train`: each trainer's
//! configuration (fdpo_train::config: TOML with TRL's names or TRL's CLI
//! YAML), every key also a flag (flags win over the file), a progress bar,
//! and `--resume RUN_DIR` continuing a run from its last complete checkpoint.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fdpo_train::config::{DpoKeys, Keys, KtoKeys, OwnKeys, RewardKeys, SftKeys, TrainConfig};
use fdpo_train::dpo::train_dpo;
use fdpo_train::sft::train_sft;
use fdpo_train::trainer::{Observer, Outcome};
use indicatif::ProgressBar;
use serde_json::{Map, Value};

use crate::output::progress;

/// Arguments of `fdpo train`, `fdpo sft` and `fdpo reward train`: the
/// trainer's configuration keys as flags, and how to run.
#[derive(Debug, Args)]
pub struct TrainArgs<S: OwnKeys> {
    /// Configuration: TOML with TRL's DPOConfig/SFTConfig names, or the YAML
    /// of TRL's command line (`trl dpo --config dpo.yaml`); flags override it.
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
    pub keys: Keys<S>,
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

/// The command that runs the trainer recorded as `trainer`.
fn command_of(trainer: &str) -> &'static str {
    match trainer {
        "sft" => SftKeys::COMMAND,
        "reward" => RewardKeys::COMMAND,
        "kto" => KtoKeys::COMMAND,
        _ => DpoKeys::COMMAND,
    }
}

/// The validated configuration of a new run or of the run being resumed;
/// warnings about the file go to stderr.
fn resolve<S: OwnKeys>(args: &TrainArgs<S>) -> Result<TrainConfig> {
    if let Some(run) = &args.resume {
        if args.keys.any() {
            bail!("--resume continues {} with its saved config.toml; drop the other options", run.display());
        }
        let path = run.join("config.toml");
        let mut config = TrainConfig::read_run(&path)?;
        if let Some(started) = config.trainer.as_deref().filter(|t| *t != S::TRAINER) {
            let command = command_of(started);
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
        Some(p) => {
            let (keys, warnings) = Keys::<S>::read(p)?;
            for w in warnings {
                eprintln!("warning: {}: {w}", p.display());
            }
            (keys, p.clone())
        }
        None => (Keys::default(), PathBuf::from("(command line)")),
    };
    let config = file.overlay(args.keys.clone())?.validate(&path)?;
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

/// Runs `fdpo train`, `fdpo sft` or `fdpo reward train`, as `S` says.
pub fn run<S: OwnKeys>(args: TrainArgs<S>) -> Result<()> {
    let config = resolve(&args)?;
    let device = fdpo_model::device(&args.device)?;
    let resume = args.resume.is_some();
    let what = match S::TRAINER {
        "sft" => "SFT",
        "reward" => "reward model",
        "kto" => "KTO",
        _ => "f-DPO",
    };
    // One progress bar and one set of messages per job: rank 0's.
    let mut progress = Progress::new(what);
    let mut quiet = fdpo_train::trainer::Quiet;
    let observer: &mut dyn fdpo_train::trainer::Observer =
        if fdpo_train::parallel::is_root() { &mut progress } else { &mut quiet };
    let context = || format!("training {}", config.output_dir.display());
    let stop = args.stop_after_steps;
    let (outcome, resumed_from) = match S::TRAINER {
        "sft" => {
            let s = train_sft(&config, &device, resume, observer, stop).with_context(context)?;
            (s.outcome, s.resumed_from)
        }
        "kto" => {
            let s =
                fdpo_train::kto::train_kto(&config, &device, resume, observer, stop).with_context(context)?;
            (s.outcome, s.resumed_from)
        }
        "reward" => {
            let s = fdpo_train::reward::train_reward(&config, &device, resume, observer, stop)
                .with_context(context)?;
            (s.outcome, s.resumed_from)
        }
        _ => {
            let s = train_dpo(&config, &device, resume, observer, stop).with_context(context)?;
            (s.outcome, s.resumed_from)
        }
    };
    if !fdpo_train::parallel::is_root() {
        return Ok(());
    }
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
