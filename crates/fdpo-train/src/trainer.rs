//! The training loop every trainer shares (SFT, f-DPO, reward model): a
//! seeded data order, gradient accumulation, clipping, the learning-rate
//! schedule, AdamW, skipping non-finite steps, logging to `metrics.jsonl`,
//! periodic evaluation, and checkpoints a killed run resumes from exactly.
//!
//! What is trained is an [`Objective`]: it turns a list of example indices
//! into a differentiable loss and named metrics. The run folder:
//!
//! ```text
//! <output_dir>/config.toml                 resolved configuration (`begin_run` writes it)
//! <output_dir>/metrics.jsonl               one JSON object per logged step / evaluation
//! <output_dir>/checkpoints/step-N/         HF layout + optimizer.safetensors + trainer_state.json
//! <output_dir>/final/                      HF layout
//! ```
//!
//! Data order: micro-batch k of the endless stream belongs to epoch
//! k / ⌈n / batch⌉; each epoch is a permutation drawn by ChaCha8 from
//! (seed, epoch). The order is therefore a function of the seed and k alone,
//! and a checkpoint stores k; there is no other randomness in training.
//! A checkpoint directory is written under a temporary name and renamed
//! when complete, so a half-written one is never picked up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use fdpo_model::{ModelError, Weights};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::TrainConfig;
use crate::optim::{AdamW, AdamWConfig};
use crate::parallel;
use crate::schedule::{clip_grad_norm, grad_norm, Schedule};

/// Errors of training; messages name the file or the step.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading the data failed.
    #[error(transparent)]
    Data(#[from] fdpo_data::DataError),
    /// A configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Reading or writing a run file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A checkpoint is unusable.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Too many non-finite steps in a row; a checkpoint was saved.
    #[error(
        "stopped at step {step}: {count} steps in a row had a non-finite loss or gradient \
         (lower learning_rate or beta, or check the data); checkpoint saved at {checkpoint}"
    )]
    NonFinite {
        /// The last step.
        step: usize,
        /// Non-finite steps in a row.
        count: usize,
        /// Where the state was saved.
        checkpoint: PathBuf,
    },
    /// Anything else, said in words.
    #[error("{0}")]
    Msg(String),
}

impl TrainError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        TrainError::Io { path: path.to_path_buf(), source }
    }
}

/// Which examples a batch is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training set.
    Train,
    /// The evaluation set.
    Eval,
}

/// What an objective returns for one batch.
#[derive(Debug)]
pub struct BatchOutput {
    /// Mean loss over the batch (a scalar, differentiable).
    pub loss: Tensor,
    /// Named metrics, each a mean over the batch (TRL's names).
    pub metrics: Vec<(&'static str, f64)>,
    /// Tokens processed (for tokens/s).
    pub tokens: usize,
}

/// What a trainer optimises.
pub trait Objective {
    /// Examples in a split.
    fn len(&self, split: Split) -> usize;
    /// Loss and metrics of the examples `indices` of `split`.
    fn batch(&self, split: Split, indices: &[usize]) -> Result<BatchOutput, TrainError>;
}

/// Hears about the run (progress bars, warnings); all methods optional.
pub trait Observer {
    /// Training starts at `step` of `total`.
    fn start(&mut self, _step: usize, _total: usize) {}
    /// An optimiser step ended.
    fn step(&mut self, _step: usize, _loss: f64, _tokens_per_s: f64) {}
    /// A record was written to metrics.jsonl.
    fn log(&mut self, _record: &Map<String, Value>) {}
    /// Something the user should know.
    fn warn(&mut self, _message: &str) {}
    /// Training ended.
    fn finish(&mut self) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Quiet;

impl Observer for Quiet {}

/// Passes every event on to another observer, except a warning it has
/// already passed: a run of several trainings (online rounds) says each
/// thing once, not once per round.
pub struct OnceWarnings<'a> {
    inner: &'a mut dyn Observer,
    seen: std::collections::HashSet<String>,
}

impl<'a> OnceWarnings<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a mut dyn Observer) -> Self {
        OnceWarnings { inner, seen: Default::default() }
    }
}

impl Observer for OnceWarnings<'_> {
    fn start(&mut self, step: usize, total: usize) {
        self.inner.start(step, total)
    }
    fn step(&mut self, step: usize, loss: f64, tokens_per_s: f64) {
        self.inner.step(step, loss, tokens_per_s)
    }
    fn log(&mut self, record: &Map<String, Value>) {
        self.inner.log(record)
    }
    fn warn(&mut self, message: &str) {
        if self.seen.insert(message.to_string()) {
            self.inner.warn(message)
        }
    }
    fn finish(&mut self) {
        self.inner.finish()
    }
}

/// What `trainer_state.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps completed (skipped non-finite steps count).
    pub global_step: usize,
    /// Micro-batches consumed: the data position.
    pub micro_batches: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// The data-order seed.
    pub seed: u64,
    /// AdamW updates applied (its bias-correction t).
    pub optimizer_steps: u64,
    /// Non-finite steps in a row at the time of saving.
    pub consecutive_nonfinite: usize,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps done; `final/` written.
    Finished {
        /// The final model directory.
        model_dir: PathBuf,
    },
    /// Stopped early on request after this step (tests of resume).
    Stopped {
        /// The last completed step.
        step: usize,
    },
}

/// The most recent complete checkpoint of a run folder: (step, directory).
pub fn last_checkpoint(output_dir: &Path) -> Option<(usize, PathBuf)> {
    let dir = output_dir.join("checkpoints");
    std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: usize = name.strip_prefix("step-")?.parse().ok()?;
            let state = e.path().join("trainer_state.json");
            let text = std::fs::read_to_string(state).ok()?;
            serde_json::from_str::<TrainerState>(&text).ok()?;
            Some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step)
}

/// The configuration with `max_length` (and, below it, `max_prompt_length`)
/// cut to the context of the policy and reference models (config.json's
/// `max_position_embeddings` / `n_positions`), with a warning when cut: a
/// longer sequence could not run at all. `uses_prompt_limit`: whether the
/// trainer reads `max_prompt_length` (SFT does not; it is moved silently).
pub fn fit_to_context(
    config: &TrainConfig,
    uses_prompt_limit: bool,
    observer: &mut dyn Observer,
) -> Result<TrainConfig, TrainError> {
    let mut limit = usize::MAX;
    for dir in [&config.model, &config.ref_model] {
        limit = limit.min(fdpo_model::ModelConfig::read(&dir.join("config.json"))?.max_positions());
    }
    let mut fitted = config.clone();
    if config.max_length > limit {
        fitted.max_length = limit;
        observer.warn(&format!(
            "max_length {} is beyond the model's context of {limit} positions (config.json); using {limit}",
            config.max_length
        ));
    }
    if let Some(m) = fitted.max_prompt_length.filter(|&m| m >= fitted.max_length) {
        let cut = (fitted.max_length / 2).max(1);
        fitted.max_prompt_length = Some(cut);
        if uses_prompt_limit {
            observer.warn(&format!(
                "max_prompt_length {m} does not fit below max_length {}; using {cut}",
                fitted.max_length
            ));
        }
    }
    Ok(fitted)
}

/// What in a run folder shows that a run was trained there (a lone
/// config.toml may be the user's own configuration file).
const RUN_MARKERS: &[&str] = &["metrics.jsonl", "checkpoints", "final"];

/// Checks, before anything is read or written, that the run can start in
/// `output_dir`: with `resume`, returns its last complete checkpoint (an
/// error when there is none); otherwise the folder must hold no earlier run
/// unless `overwrite_output_dir` is set, so that a new run never mixes with
/// an old one's checkpoints, configuration or metrics.
pub fn check_run(config: &TrainConfig, resume: bool) -> Result<Option<(usize, PathBuf)>, TrainError> {
    let out = &config.output_dir;
    if resume {
        return last_checkpoint(out).map(Some).ok_or_else(|| {
            TrainError::Msg(format!(
                "{}: no complete checkpoint to resume from",
                out.join("checkpoints").display()
            ))
        });
    }
    let found: Vec<&str> = RUN_MARKERS.iter().copied().filter(|m| out.join(m).exists()).collect();
    if found.is_empty() {
        return Ok(None);
    }
    if !config.overwrite_output_dir {
        let resume = match last_checkpoint(out) {
            Some((step, _)) => {
                format!(" (last checkpoint: step {step}); continue it with `--resume {}`,", out.display())
            }
            None => ";".into(),
        };
        return Err(TrainError::Msg(format!(
            "{} already holds a run ({}){resume} choose another output_dir, \
             or start over with overwrite_output_dir (--overwrite-output-dir)",
            out.display(),
            found.join(", "),
        )));
    }
    // Overwriting deletes checkpoints/ and final/: never what this run reads.
    let inputs =
        [Some(&config.model), Some(&config.ref_model), Some(&config.train_file), config.eval_file.as_ref()];
    for input in inputs.into_iter().flatten() {
        let input = input.canonicalize().unwrap_or_else(|_| input.clone());
        for marker in RUN_MARKERS {
            if let Ok(doomed) = out.join(marker).canonicalize() {
                if input.starts_with(&doomed) {
                    return Err(TrainError::Msg(format!(
                        "overwrite_output_dir would delete {}, which this run reads ({}); choose another output_dir",
                        doomed.display(),
                        input.display()
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// Opens the run folder once its data and models have loaded: creates it
/// and, for a new run, clears what an earlier run left (with
/// `overwrite_output_dir`; the reference cache stays, it checks its own key)
/// and writes the resolved `config.toml`. A resumed run keeps its folder
/// as it is. The trainers call [`check_run`] first and this just before
/// training, so a start that fails on its inputs writes nothing.
pub fn begin_run(config: &TrainConfig, resume: bool) -> Result<(), TrainError> {
    // Every rank has read the folder (check_run) before rank 0 changes it,
    // and none goes on before it has.
    parallel::barrier();
    let started = if parallel::is_root() { start_folder(config, resume) } else { Ok(()) };
    parallel::barrier();
    started
}

fn start_folder(config: &TrainConfig, resume: bool) -> Result<(), TrainError> {
    let out = &config.output_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    if resume {
        return Ok(());
    }
    for marker in RUN_MARKERS {
        let path = out.join(marker);
        let removed =
            if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(TrainError::io(&path, e)),
            _ => {}
        }
    }
    let path = out.join("config.toml");
    fdpo_core::write_atomic(&path, config.to_toml().as_bytes()).map_err(|e| TrainError::io(&path, e))
}

/// The permutation of `n` examples for `epoch`.
fn epoch_order(seed: u64, epoch: usize, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// Metric sums over a logging window.
#[derive(Debug, Default)]
struct Window {
    /// Per metric: Σ weight·value and Σ weight over the batches that
    /// reported it (a KTO batch without desirable examples has no
    /// `rewards/chosen`), so each metric is the mean where it is defined.
    sums: Vec<(String, f64, f64)>,
    batches: usize,
    grad_norm: f64,
    steps: usize,
    /// Steps skipped for a non-finite loss or gradient.
    skipped: usize,
    tokens: usize,
    seconds: f64,
}

impl Window {
    fn add(&mut self, name: &str, value: f64, weight: f64) {
        self.add_sums(name, weight * value, weight);
    }

    fn add_sums(&mut self, name: &str, sum: f64, weight: f64) {
        match self.sums.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, s, w)) => {
                *s += sum;
                *w += weight;
            }
            None => self.sums.push((name.to_string(), sum, weight)),
        }
    }

    /// This window with every rank's metric sums and batch counts added
    /// (in rank order); the step counts, gradient norms, tokens and times
    /// are already the job's on every rank.
    fn gathered(self) -> Window {
        if parallel::size() == 1 {
            return self;
        }
        let mine = serde_json::to_vec(&(&self.sums, self.batches)).expect("plain data");
        let mut out = Window { sums: vec![], batches: 0, ..self };
        for bytes in parallel::all_gather_bytes(&mine) {
            let (sums, batches): (Vec<(String, f64, f64)>, usize) =
                serde_json::from_slice(&bytes).expect("written by a rank of this job");
            for (name, sum, weight) in sums {
                out.add_sums(&name, sum, weight);
            }
            out.batches += batches;
        }
        out
    }
}

/// The job's gradient: each variable's gradient (zero where this rank has
/// none) summed over the ranks, in one flat f32 buffer.
fn sum_over_ranks(grads: Option<GradStore>, vars: &[Var]) -> Result<GradStore, TrainError> {
    let mut flat: Vec<f32> = Vec::new();
    for v in vars {
        match grads.as_ref().and_then(|g| g.get(v.as_tensor())) {
            Some(g) => flat.extend(g.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0.0, v.elem_count())),
        }
    }
    parallel::all_reduce_sum_f32(&mut flat);
    let mut out = grads.unwrap_or_default();
    let mut offset = 0;
    for v in vars {
        let n = v.elem_count();
        let g = Tensor::from_slice(&flat[offset..offset + n], v.dims(), v.device())?.to_dtype(v.dtype())?;
        out.insert(v.as_tensor(), g);
        offset += n;
    }
    Ok(out)
}

/// Writes the model being trained into a directory.
pub type ModelSaver<'a> = Box<dyn Fn(&Path) -> Result<(), ModelError> + 'a>;

/// The loop, its optimiser and its position.
pub struct Trainer<'a> {
    config: &'a TrainConfig,
    weights: &'a Weights,
    /// Where config.json and the tokenizer files are copied from.
    source: PathBuf,
    optimizer: AdamW,
    state: TrainerState,
    schedule: Schedule,
    saver: Option<ModelSaver<'a>>,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("state", &self.state).field("schedule", &self.schedule).finish()
    }
}

impl<'a> Trainer<'a> {
    /// A trainer of `weights` (those of the model the objective runs) for a
    /// run of `train_examples` examples; `source` is the model directory
    /// whose metadata files every saved model gets.
    pub fn new(
        config: &'a TrainConfig,
        weights: &'a Weights,
        source: &Path,
        train_examples: usize,
    ) -> Result<Self, TrainError> {
        if train_examples == 0 {
            return Err(TrainError::Msg(format!(
                "{}: no usable training examples",
                config.train_file.display()
            )));
        }
        let per_epoch = train_examples.div_ceil(config.batch_size);
        let total_steps = config.max_steps.unwrap_or_else(|| {
            ((config.num_train_epochs * per_epoch as f64) / config.gradient_accumulation_steps as f64)
                .ceil()
                .max(1.0) as usize
        });
        let warmup_steps =
            config.warmup_steps.unwrap_or_else(|| (config.warmup_ratio * total_steps as f64).ceil() as usize);
        let schedule = Schedule {
            learning_rate: config.learning_rate,
            warmup_steps,
            total_steps,
            kind: config.schedule,
        };
        let optimizer = AdamW::new(
            weights.vars(),
            AdamWConfig { weight_decay: config.weight_decay, ..Default::default() },
        )?;
        let state = TrainerState { total_steps, seed: config.seed, ..Default::default() };
        Ok(Trainer { config, weights, source: source.to_path_buf(), optimizer, state, schedule, saver: None })
    }

    /// Saves models (checkpoints, `final/`) with `saver` instead of the
    /// causal-LM layout (e.g. a reward model's).
    pub fn with_saver(mut self, saver: ModelSaver<'a>) -> Self {
        self.saver = Some(saver);
        self
    }

    fn save_model(&self, dir: &Path) -> Result<(), TrainError> {
        match &self.saver {
            Some(save) => save(dir)?,
            None => fdpo_model::save::save_pretrained(self.weights, &self.source, dir)?,
        }
        Ok(())
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> usize {
        self.state.total_steps
    }

    /// The position reached.
    pub fn state(&self) -> &TrainerState {
        &self.state
    }

    /// Continues from `checkpoint` (whose weights the model was loaded
    /// from): restores the optimiser, the step and the data position, and
    /// drops records after that step from metrics.jsonl.
    pub fn resume_from(&mut self, checkpoint: &Path) -> Result<(), TrainError> {
        let state_path = checkpoint.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state: TrainerState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Checkpoint { path: state_path.clone(), message: e.to_string() })?;
        if state.total_steps != self.state.total_steps || state.seed != self.state.seed {
            return Err(TrainError::Checkpoint {
                path: state_path,
                message: format!(
                    "saved for {} steps with seed {}, this configuration gives {} steps with seed {}",
                    state.total_steps, state.seed, self.state.total_steps, self.state.seed
                ),
            });
        }
        self.optimizer
            .load(&checkpoint.join("optimizer.safetensors"), state.optimizer_steps)
            .map_err(|message| TrainError::Checkpoint { path: checkpoint.into(), message })?;
        self.state = state;
        let metrics = self.config.output_dir.join("metrics.jsonl");
        if !parallel::is_root() {
            return Ok(());
        }
        if let Ok(text) = std::fs::read_to_string(&metrics) {
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("step").and_then(Value::as_u64))
                        .is_some_and(|s| s as usize <= self.state.global_step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            fdpo_core::write_atomic(&metrics, kept.as_bytes()).map_err(|e| TrainError::io(&metrics, e))?;
        }
        Ok(())
    }

    fn vars(&self) -> Vec<Var> {
        self.optimizer.vars()
    }

    fn epoch(&self, examples: usize) -> f64 {
        self.state.micro_batches as f64 / examples.div_ceil(self.config.batch_size) as f64
    }

    /// The `metrics.jsonl` record of a logging window ending at the current
    /// step: mean metrics over its finite micro-batches, mean gradient norm
    /// over its applied steps, and `skipped_steps` when any was skipped.
    fn window_record(&self, window: &Window, lr: f64) -> Map<String, Value> {
        let mut record = Map::new();
        record.insert("step".into(), self.state.global_step.into());
        record.insert("epoch".into(), json_number(self.state.epoch));
        for (name, sum, weight) in &window.sums {
            record.insert(name.clone(), json_number(sum / weight));
        }
        if window.steps > 0 {
            record.insert("grad_norm".into(), json_number(window.grad_norm / window.steps as f64));
        }
        if window.skipped > 0 {
            record.insert("skipped_steps".into(), window.skipped.into());
        }
        record.insert("learning_rate".into(), json_number(lr));
        if window.tokens > 0 {
            record.insert("tokens_per_s".into(), json_number(window.tokens as f64 / window.seconds));
        }
        record
    }

    /// Appends a record to metrics.jsonl (rank 0 only).
    fn write_record(&self, record: &Map<String, Value>) -> Result<(), TrainError> {
        if !parallel::is_root() {
            return Ok(());
        }
        let path = self.config.output_dir.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        writeln!(file, "{}", Value::Object(record.clone())).map_err(|e| TrainError::io(&path, e))
    }

    /// Mean loss and metrics over the whole evaluation split, `eval_` prefixed.
    pub fn evaluate(&self, objective: &dyn Objective) -> Result<Map<String, Value>, TrainError> {
        let n = objective.len(Split::Eval);
        let mut window = Window::default();
        let indices: Vec<usize> = (0..n).collect();
        for chunk in indices.chunks(self.config.eval_batch_size) {
            let out = objective.batch(Split::Eval, chunk)?;
            let w = chunk.len() as f64;
            window.add("loss", out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?, w);
            for (name, value) in out.metrics {
                window.add(name, value, w);
            }
        }
        let mut record = Map::new();
        for (name, sum, weight) in window.sums {
            record.insert(format!("eval_{name}"), json_number(sum / weight));
        }
        Ok(record)
    }

    /// Writes `checkpoints/step-N/` atomically (a temporary directory
    /// renamed); rank 0 writes, every rank returns the path.
    pub fn save_checkpoint(&self) -> Result<PathBuf, TrainError> {
        let root = self.config.output_dir.join("checkpoints");
        let step = self.state.global_step;
        let tmp = root.join(format!(".tmp-step-{step}"));
        let done = root.join(format!("step-{step}"));
        if !parallel::is_root() {
            return Ok(done);
        }
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        self.save_model(&tmp)?;
        let opt = tmp.join("optimizer.safetensors");
        self.optimizer.save(&opt).map_err(|e| TrainError::io(&opt, e))?;
        let state = tmp.join("trainer_state.json");
        let text = serde_json::to_string_pretty(&self.state).expect("plain struct");
        fdpo_core::write_atomic(&state, text.as_bytes()).map_err(|e| TrainError::io(&state, e))?;
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(|e| TrainError::io(&done, e))?;
        }
        std::fs::rename(&tmp, &done).map_err(|e| TrainError::io(&done, e))?;
        if let Some(limit) = self.config.save_total_limit {
            // Only once the new checkpoint is complete: delete the oldest
            // complete ones, never this one (half-written folders are not
            // counted; saving their step again clears them).
            let mut steps: Vec<usize> = std::fs::read_dir(&root)
                .map_err(|e| TrainError::io(&root, e))?
                .filter_map(|e| {
                    let e = e.ok()?;
                    let s: usize = e.file_name().to_str()?.strip_prefix("step-")?.parse().ok()?;
                    (s != step && e.path().join("trainer_state.json").exists()).then_some(s)
                })
                .collect();
            steps.sort_unstable();
            for old in &steps[..steps.len().saturating_sub(limit - 1)] {
                let dir = root.join(format!("step-{old}"));
                std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
            }
        }
        Ok(done)
    }

    /// Runs from the current position to the last step (or through step
    /// `stop_after`, leaving the run as a kill after that step would).
    pub fn run(
        &mut self,
        objective: &dyn Objective,
        observer: &mut dyn Observer,
        stop_after: Option<usize>,
    ) -> Result<Outcome, TrainError> {
        let out_dir = self.config.output_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(|e| TrainError::io(&out_dir, e))?;
        let n = objective.len(Split::Train);
        let per_epoch = n.div_ceil(self.config.batch_size);
        let accum = self.config.gradient_accumulation_steps;
        let vars = self.vars();
        let has_eval = objective.len(Split::Eval) > 0;
        let mut order: (usize, Vec<usize>) = (usize::MAX, vec![]);
        let mut window = Window::default();
        let mut evaluated_at = None;
        let share = parallel::micro_batches_of(accum, parallel::rank(), parallel::size());
        if self.state.global_step == 0 && parallel::is_root() {
            // A fresh run starts a fresh log.
            let metrics = out_dir.join("metrics.jsonl");
            fdpo_core::write_atomic(&metrics, b"").map_err(|e| TrainError::io(&metrics, e))?;
        }
        if self.state.global_step == 0 && self.schedule.warmup_steps >= self.state.total_steps {
            observer.warn(&format!(
                "the warmup ({} steps) covers the whole run ({} steps): the learning rate never reaches learning_rate{}",
                self.schedule.warmup_steps,
                self.state.total_steps,
                if self.state.total_steps == 1 { ", and the only step runs at 0" } else { "" }
            ));
        }
        observer.start(self.state.global_step, self.state.total_steps);
        while self.state.global_step < self.state.total_steps {
            let step = self.state.global_step;
            let lr = self.schedule.rate(step);
            let started = Instant::now();
            let mut grads: Option<GradStore> = None;
            let mut finite = true;
            let mut step_loss = 0.0;
            let mut step_tokens = 0;
            if let Some(message) = parallel::injected_failure(step + 1) {
                return Err(TrainError::Msg(message));
            }
            // This rank's share of the step's micro-batches (all of them alone).
            let base = self.state.micro_batches;
            self.state.micro_batches += accum;
            for offset in share.clone() {
                let k = base + offset;
                let (epoch, j) = (k / per_epoch, k % per_epoch);
                if order.0 != epoch {
                    order = (epoch, epoch_order(self.config.seed, epoch, n));
                }
                let indices = &order.1[j * self.config.batch_size..((j + 1) * self.config.batch_size).min(n)];
                let out = objective.batch(Split::Train, indices)?;
                let loss = out.loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if !loss.is_finite() {
                    finite = false;
                    continue;
                }
                step_loss += loss / accum as f64;
                step_tokens += out.tokens;
                window.batches += 1;
                window.add("loss", loss, 1.0);
                for (name, value) in &out.metrics {
                    window.add(name, *value, 1.0);
                }
                let g = (out.loss / accum as f64)?.backward()?;
                grads = Some(match grads.take() {
                    None => g,
                    Some(mut acc) => {
                        for v in &vars {
                            if let Some(new) = g.get(v.as_tensor()) {
                                let sum = match acc.get(v.as_tensor()) {
                                    Some(old) => (old + new)?,
                                    None => new.clone(),
                                };
                                acc.insert(v.as_tensor(), sum);
                            }
                        }
                        acc
                    }
                });
            }
            if parallel::size() > 1 {
                // The job's step: any rank's non-finite loss skips it everywhere.
                let mut counts = [f64::from(u8::from(!finite)), step_loss, step_tokens as f64];
                parallel::all_reduce_sum_f64(&mut counts);
                (finite, step_loss, step_tokens) = (counts[0] == 0.0, counts[1], counts[2] as usize);
                grads = Some(sum_over_ranks(grads, &vars)?);
            }
            let mut norm = f64::NAN;
            if let (true, Some(g)) = (finite, grads.as_mut()) {
                norm = match self.config.max_grad_norm {
                    Some(max) => clip_grad_norm(g, &vars, max)?,
                    None => grad_norm(g, &vars)?,
                };
                finite = norm.is_finite();
            }
            self.state.global_step += 1;
            self.state.epoch = self.epoch(n);
            match (finite, grads) {
                (true, Some(g)) => {
                    self.optimizer.step(&g, lr)?;
                    self.state.optimizer_steps = self.optimizer.steps();
                    self.state.consecutive_nonfinite = 0;
                    window.grad_norm += norm;
                    window.steps += 1;
                }
                _ => {
                    self.state.consecutive_nonfinite += 1;
                    window.skipped += 1;
                    observer.warn(&format!(
                        "step {}: non-finite loss or gradient, step skipped ({} in a row)",
                        step + 1,
                        self.state.consecutive_nonfinite
                    ));
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            window.tokens += step_tokens;
            window.seconds += seconds;
            if self.state.consecutive_nonfinite >= self.config.max_nonfinite_steps {
                // The window so far, this step and its skipped steps included, goes to metrics.jsonl.
                window = window.gathered();
                let record = self.window_record(&window, lr);
                self.write_record(&record)?;
                observer.log(&record);
                let checkpoint = self.save_checkpoint()?;
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    count: self.state.consecutive_nonfinite,
                    checkpoint,
                });
            }
            let done = self.state.global_step;
            // A skipped step shows as NaN, not as the 0 its sum started from.
            let shown = if finite { step_loss } else { f64::NAN };
            observer.step(done, shown, step_tokens as f64 / seconds.max(1e-9));
            if done.is_multiple_of(self.config.logging_steps) || done == self.state.total_steps {
                window = window.gathered();
                let record = self.window_record(&window, lr);
                self.write_record(&record)?;
                observer.log(&record);
                window = Window::default();
            }
            if has_eval
                && parallel::is_root()
                && self.config.eval_steps.is_some_and(|e| done.is_multiple_of(e))
            {
                self.log_eval(objective, observer)?;
                evaluated_at = Some(done);
            }
            if done.is_multiple_of(self.config.save_steps) {
                self.save_checkpoint()?;
            }
            if stop_after == Some(done) && done < self.state.total_steps {
                return Ok(Outcome::Stopped { step: done });
            }
        }
        if has_eval && parallel::is_root() && evaluated_at != Some(self.state.global_step) {
            self.log_eval(objective, observer)?;
        }
        let model_dir = out_dir.join("final");
        if !parallel::is_root() {
            // Rank 0 writes final/; the job ends when it has.
            parallel::barrier();
            observer.finish();
            return Ok(Outcome::Finished { model_dir });
        }
        let tmp = out_dir.join(".tmp-final");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        self.save_model(&tmp)?;
        if model_dir.exists() {
            std::fs::remove_dir_all(&model_dir).map_err(|e| TrainError::io(&model_dir, e))?;
        }
        std::fs::rename(&tmp, &model_dir).map_err(|e| TrainError::io(&model_dir, e))?;
        parallel::barrier();
        observer.finish();
        Ok(Outcome::Finished { model_dir })
    }

    fn log_eval(&self, objective: &dyn Objective, observer: &mut dyn Observer) -> Result<(), TrainError> {
        let mut record = Map::new();
        record.insert("step".into(), self.state.global_step.into());
        record.insert("epoch".into(), json_number(self.state.epoch));
        record.extend(self.evaluate(objective)?);
        self.write_record(&record)?;
        observer.log(&record);
        Ok(())
    }
}

/// A JSON number, or null for NaN and infinities (JSON has none).
fn json_number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}
