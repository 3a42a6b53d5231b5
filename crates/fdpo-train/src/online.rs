//! Online / iterative f-DPO (`fdpo online`): each round samples groups of K
//! responses per prompt from the current policy, scores them with a judge
//! (a reward model, or the demo task's true reward), pairs the best with
//! the worst of each group, and trains f-DPO on those pairs against the
//! fixed reference (or the previous round's policy). After every round the
//! policy is evaluated on fresh samples (judged reward, the demo task's true
//! reward when the prompts are the demo's, diversity), and the round is
//! recorded in `round-N/round.json` and `rounds.jsonl`. Running the same
//! command again continues after the last completed round.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fdpo_core::diversity::{distinct_n, has_ngrams, mean_std, self_bleu};
use fdpo_core::Divergence;
use fdpo_data::{tokenize_prompt, Text};
use fdpo_model::reward::RewardModel;
use fdpo_model::sample::{eos_ids, generate_batch, SamplingConfig};
use fdpo_model::{CausalLm, TextTokenizer};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{CommonKeys, DpoFile, DpoKeys};
use crate::dpo::train_dpo;
use crate::task::ReviewTask;
use crate::trainer::{Observer, OnceWarnings, Outcome, TrainError};

/// Who scores responses.
#[derive(Debug)]
pub enum Judge {
    /// A Bradley–Terry reward model, and where it was loaded from.
    RewardModel(Box<RewardModel>, PathBuf),
    /// The demo task's true reward (fdpo_train::task).
    DemoReward,
}

impl Judge {
    /// Parses `reward-model:DIR` or `demo-reward`, loading the model.
    pub fn load(spec: &str, device: &Device) -> Result<Judge, TrainError> {
        if spec == "demo-reward" {
            return Ok(Judge::DemoReward);
        }
        let dir = spec.strip_prefix("reward-model:").ok_or_else(|| {
            TrainError::Msg(format!("--judge `{spec}`: expected reward-model:DIR or demo-reward"))
        })?;
        let pad = TextTokenizer::load(Path::new(dir))?.pad_id();
        let (model, _) = RewardModel::load(Path::new(dir), pad, DType::F32, device)?;
        Ok(Judge::RewardModel(Box::new(model), PathBuf::from(dir)))
    }

    /// The judge as `--judge` names it.
    pub fn spec(&self) -> String {
        match self {
            Judge::DemoReward => "demo-reward".into(),
            Judge::RewardModel(_, dir) => format!("reward-model:{}", dir.display()),
        }
    }

    /// Scores of `responses` to a prompt (ids from `tokenizer`).
    fn score(
        &self,
        tokenizer: &TextTokenizer,
        prompt: &[u32],
        responses: &[String],
        device: &Device,
    ) -> Result<Vec<f64>, TrainError> {
        match self {
            Judge::DemoReward => Ok(responses.iter().map(|r| ReviewTask::reward(r)).collect()),
            Judge::RewardModel(m, _) => {
                let seqs = responses
                    .iter()
                    .map(|r| {
                        let mut ids = tokenizer.encode(r, false)?;
                        // Decoded text may tokenise a little longer than the
                        // sampled ids were; keep what fits beside the EOS.
                        ids.truncate(m.max_positions().saturating_sub(prompt.len() + 1));
                        ids.extend(tokenizer.eos_id());
                        Ok((prompt.to_vec(), ids))
                    })
                    .collect::<Result<Vec<_>, TrainError>>()?;
                let mut out = Vec::with_capacity(seqs.len());
                for chunk in seqs.chunks(64) {
                    out.extend(m.score(chunk, device)?);
                }
                Ok(out)
            }
        }
    }
}

/// What the policy is trained against each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The fixed reference.
    Reference,
    /// The previous round's policy.
    Previous,
}

/// Settings of an online run.
#[derive(Debug, Clone)]
pub struct OnlineConfig {
    /// The initial policy.
    pub policy: PathBuf,
    /// The reference (default: the initial policy).
    pub ref_model: PathBuf,
    /// Prompts, as text.
    pub prompts: Vec<String>,
    /// Run folder.
    pub output_dir: PathBuf,
    /// Rounds.
    pub rounds: usize,
    /// Groups (hence pairs) per prompt per round.
    pub groups: usize,
    /// Samples per group.
    pub samples: usize,
    /// Samples per prompt for evaluation.
    pub eval_samples: usize,
    /// What the policy is trained against.
    pub anchor: Anchor,
    /// The divergence.
    pub divergence: Divergence,
    /// β.
    pub beta: f64,
    /// f-DPO learning rate.
    pub learning_rate: f64,
    /// Epochs over each round's pairs.
    pub num_train_epochs: f64,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Token limits of training.
    pub max_length: usize,
    /// Prompt limit.
    pub max_prompt_length: usize,
    /// Tokens generated at most.
    pub max_new_tokens: usize,
    /// Seed.
    pub seed: u64,
    /// Also report the demo task's true reward.
    pub demo_task: bool,
}

/// One round's record (round 0: the initial policy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: usize,
    /// Preference labels used so far.
    pub labels: usize,
    /// Mean judge score of the evaluation samples.
    pub judged_reward: f64,
    /// Mean true reward (demo task only).
    pub true_reward: Option<f64>,
    /// Per-input distinct-1 (None, null in JSON, when no prompt has a token).
    pub distinct_1: Option<f64>,
    /// Per-input distinct-2 (None when no prompt has a response of 2 tokens).
    pub distinct_2: Option<f64>,
    /// Per-input 1 − self-BLEU (None with fewer than 2 samples per prompt).
    pub one_minus_self_bleu: Option<f64>,
    /// The policy's directory.
    pub policy: PathBuf,
}

/// Policy samples and their evaluation.
struct Sampler<'a> {
    tokenizer: &'a TextTokenizer,
    prompts: Vec<Vec<u32>>,
    device: &'a Device,
}

impl Sampler<'_> {
    fn sample(
        &self,
        dir: &Path,
        k: usize,
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<Vec<String>>, TrainError> {
        let (model, _) = CausalLm::load(dir, DType::F32, self.device)?;
        let eos = eos_ids(dir, self.tokenizer.eos_id())?;
        let cfg = SamplingConfig { max_new_tokens, temperature: 1.0, top_k: None, top_p: None, seed };
        let ids = generate_batch(&model, &self.prompts, 0, k, &eos, &cfg, self.device)?;
        ids.iter()
            .map(|per| {
                per.iter()
                    .map(|r| Ok(self.tokenizer.decode(r, true)?))
                    .collect::<Result<Vec<_>, TrainError>>()
            })
            .collect()
    }
}

/// Evaluates the policy in `dir` as a round does: `eval_samples` samples per
/// prompt, their mean judged and (demo task) true reward, per-input diversity.
pub fn evaluate_policy_dir(
    cfg: &OnlineConfig,
    judge: &Judge,
    device: &Device,
    dir: &Path,
    round: usize,
    labels: usize,
) -> Result<RoundRecord, TrainError> {
    let tokenizer = TextTokenizer::load(&cfg.policy)?;
    let prompts = cfg
        .prompts
        .iter()
        .map(|p| tokenize_prompt(&tokenizer, &Text::Plain(p.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    evaluate(cfg, &Sampler { tokenizer: &tokenizer, prompts, device }, judge, dir, round, labels)
}

fn evaluate(
    cfg: &OnlineConfig,
    sampler: &Sampler,
    judge: &Judge,
    dir: &Path,
    round: usize,
    labels: usize,
) -> Result<RoundRecord, TrainError> {
    let samples = sampler.sample(dir, cfg.eval_samples, cfg.max_new_tokens, cfg.seed ^ 0xe7a1)?;
    let mut judged = vec![];
    let (mut d1, mut d2, mut sb) = (vec![], vec![], vec![]);
    for (g, per) in samples.iter().enumerate() {
        judged.extend(judge.score(sampler.tokenizer, &sampler.prompts[g], per, sampler.device)?);
        let tokens: Vec<Vec<u32>> =
            per.iter().map(|t| sampler.tokenizer.encode(t, false)).collect::<Result<_, _>>()?;
        // A metric undefined for a prompt leaves it out of the mean, as in `fdpo eval diversity`.
        d1.extend(has_ngrams(&tokens, 1).then(|| distinct_n(&tokens, 1)));
        d2.extend(has_ngrams(&tokens, 2).then(|| distinct_n(&tokens, 2)));
        sb.extend((tokens.len() >= 2).then(|| 1.0 - self_bleu(&tokens)));
    }
    let true_reward = cfg
        .demo_task
        .then(|| mean_std(&samples.iter().flatten().map(|t| ReviewTask::reward(t)).collect::<Vec<_>>()).0);
    Ok(RoundRecord {
        round,
        labels,
        judged_reward: mean_std(&judged).0,
        true_reward,
        distinct_1: (!d1.is_empty()).then(|| mean_std(&d1).0),
        distinct_2: (!d2.is_empty()).then(|| mean_std(&d2).0),
        one_minus_self_bleu: (!sb.is_empty()).then(|| mean_std(&sb).0),
        policy: dir.to_path_buf(),
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).expect("plain struct");
    fdpo_core::write_atomic(path, text.as_bytes())
        .map_err(|e| TrainError::Io { path: path.into(), source: e })
}

fn read_record(path: &Path) -> Option<RoundRecord> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Everything that shapes an online run's rounds (all settings but the
/// number of rounds), as recorded in `online.json`.
fn settings(cfg: &OnlineConfig, judge: &Judge) -> serde_json::Value {
    json!({
        "policy": cfg.policy, "ref_model": cfg.ref_model, "judge": judge.spec(), "prompts": cfg.prompts,
        "groups": cfg.groups, "samples": cfg.samples, "eval_samples": cfg.eval_samples,
        "against": format!("{:?}", cfg.anchor).to_lowercase(), "f_divergence_type": cfg.divergence.name(),
        "beta": cfg.beta, "learning_rate": cfg.learning_rate, "num_train_epochs": cfg.num_train_epochs,
        "per_device_train_batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "max_prompt_length": cfg.max_prompt_length, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
        "demo_task": cfg.demo_task,
    })
}

/// Records the run's settings in `online.json`, or, when the folder already
/// holds a run, checks that they are the same: continuing a run under other
/// settings (another β, judge or reference) would mix two experiments.
fn check_settings(cfg: &OnlineConfig, judge: &Judge) -> Result<(), TrainError> {
    let path = cfg.output_dir.join("online.json");
    let now = settings(cfg, judge);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let before: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::Msg(format!("{}: not readable: {e}", path.display())))?;
        let changed: Vec<String> = now
            .as_object()
            .expect("an object")
            .iter()
            .filter(|(k, v)| before.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                let was = before.get(k.as_str()).map_or("(absent)".into(), |w| w.to_string());
                format!("{k} {was} → {v}")
            })
            .collect();
        if !changed.is_empty() {
            return Err(TrainError::Msg(format!(
                "{} holds an online run with other settings ({}); continue it with the same settings \
                 (only --rounds may change) or choose another --output-dir",
                cfg.output_dir.display(),
                changed.join(", ")
            )));
        }
        return Ok(());
    }
    let text = serde_json::to_string_pretty(&now).expect("plain values");
    fdpo_core::write_atomic(&path, text.as_bytes()).map_err(|e| TrainError::Io { path, source: e })
}

/// The f-DPO configuration of one round, training `current` on `prefs`
/// into `dir/train`.
fn round_file(cfg: &OnlineConfig, round: usize, current: &Path, prefs: PathBuf, dir: &Path) -> DpoFile {
    let anchor = match cfg.anchor {
        Anchor::Reference => cfg.ref_model.clone(),
        Anchor::Previous => current.to_path_buf(),
    };
    let common = CommonKeys {
        model: Some(current.to_path_buf()),
        train_file: Some(prefs),
        output_dir: Some(dir.join("train")),
        learning_rate: Some(cfg.learning_rate),
        per_device_train_batch_size: Some(cfg.batch_size),
        num_train_epochs: Some(cfg.num_train_epochs),
        max_length: Some(cfg.max_length),
        max_prompt_length: Some(cfg.max_prompt_length),
        // No warmup: a round is often a single optimiser step, which a
        // warmup would run at learning rate 0.
        warmup_ratio: Some(0.0),
        save_steps: Some(1_000_000),
        seed: Some(cfg.seed.wrapping_add(round as u64)),
        // A round killed mid-training is trained again from its start.
        overwrite_output_dir: Some(true),
        ..Default::default()
    };
    let own = DpoKeys {
        ref_model: Some(anchor),
        beta: Some(cfg.beta),
        f_divergence_type: Some(cfg.divergence.name()),
        ..Default::default()
    };
    DpoFile { common, own }
}

/// Writes `rounds.jsonl`: one line per round so far.
fn write_log(out: &Path, records: &[RoundRecord]) -> Result<(), TrainError> {
    let log: String =
        records.iter().map(|r| serde_json::to_string(r).expect("plain struct") + "\n").collect();
    let path = out.join("rounds.jsonl");
    fdpo_core::write_atomic(&path, log.as_bytes()).map_err(|e| TrainError::Io { path, source: e })
}

/// Runs (or continues) the online loop; returns one record per round,
/// round 0 being the initial policy. `on_round` hears each finished round.
pub fn run_online(
    cfg: &OnlineConfig,
    judge: &Judge,
    device: &Device,
    observer: &mut dyn Observer,
    mut on_round: impl FnMut(&RoundRecord),
) -> Result<Vec<RoundRecord>, TrainError> {
    // Every round trains under the same settings: a warning about them
    // (max_length beyond the context, say) is said once.
    let observer = &mut OnceWarnings::new(observer);
    let out = &cfg.output_dir;
    // The rounds' training settings are checked before round 0's sampling.
    round_file(cfg, 1, &cfg.policy, out.join("prefs.jsonl"), out).validate(&out.join("(online settings)"))?;
    let tokenizer = TextTokenizer::load(&cfg.policy)?;
    let prompts = cfg
        .prompts
        .iter()
        .map(|p| tokenize_prompt(&tokenizer, &Text::Plain(p.clone())))
        .collect::<Result<Vec<_>, _>>()?;
    // Samples must fit the policy's context and, judged with an EOS, the judge's.
    let mut context = fdpo_model::ModelConfig::read(&cfg.policy.join("config.json"))?.max_positions();
    if let Judge::RewardModel(m, _) = judge {
        context = context.min(m.max_positions());
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = context.saturating_sub(longest + 1);
    if room == 0 {
        return Err(TrainError::Msg(format!(
            "the longest prompt ({longest} tokens) leaves no room for a response in the {context} positions of the policy or judge"
        )));
    }
    // The inputs load and fit: the settings can be recorded (or compared).
    std::fs::create_dir_all(out).map_err(|e| TrainError::Io { path: out.clone(), source: e })?;
    check_settings(cfg, judge)?;
    let fitted;
    let cfg = if cfg.max_new_tokens > room {
        observer.warn(&format!(
            "max_new_tokens {} does not fit the {context} positions of the policy or judge after a {longest}-token prompt; using {room}",
            cfg.max_new_tokens
        ));
        fitted = OnlineConfig { max_new_tokens: room, ..cfg.clone() };
        &fitted
    } else {
        cfg
    };
    let sampler = Sampler { tokenizer: &tokenizer, prompts, device };
    let start_path = out.join("round-0.json");
    let first = match read_record(&start_path) {
        Some(r) => r,
        None => {
            let r = evaluate(cfg, &sampler, judge, &cfg.policy, 0, 0)?;
            write_json(&start_path, &r)?;
            r
        }
    };
    on_round(&first);
    let mut records = vec![first];
    if !out.join("rounds.jsonl").exists() {
        write_log(out, &records)?;
    }
    for round in 1..=cfg.rounds {
        let dir = out.join(format!("round-{round}"));
        let done = dir.join("round.json");
        if let Some(mut r) = read_record(&done) {
            observer.warn(&format!("round {round}: already done, continuing after it"));
            // The policy as this folder holds it now (the folder may have moved).
            let here = dir.join("train").join("final");
            if here.exists() {
                r.policy = here;
            }
            on_round(&r);
            records.push(r);
            // The log never loses a completed round, even if a later one fails.
            write_log(out, &records)?;
            continue;
        }
        let current = records.last().expect("round 0").policy.clone();
        let k = cfg.samples.max(2);
        let samples =
            sampler.sample(&current, cfg.groups * k, cfg.max_new_tokens, cfg.seed ^ (round as u64) << 20)?;
        let mut lines = String::new();
        let mut labels = 0;
        for (g, per) in samples.iter().enumerate() {
            let scores = judge.score(&tokenizer, &sampler.prompts[g], per, device)?;
            for group in 0..cfg.groups {
                let range = group * k..(group + 1) * k;
                let best = range.clone().max_by(|&a, &b| scores[a].total_cmp(&scores[b])).expect("k ≥ 2");
                let worst = range.min_by(|&a, &b| scores[a].total_cmp(&scores[b])).expect("k ≥ 2");
                if scores[best] > scores[worst] && per[best] != per[worst] {
                    let line = json!({"prompt": cfg.prompts[g], "chosen": format!(" {}", per[best]),
                                      "rejected": format!(" {}", per[worst])});
                    lines.push_str(&line.to_string());
                    lines.push('\n');
                    labels += 1;
                }
            }
        }
        if labels == 0 {
            return Err(TrainError::Msg(format!(
                "round {round}: the judge scored every group's samples equal; no pairs to train on"
            )));
        }
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::Io { path: dir.clone(), source: e })?;
        let prefs = dir.join("prefs.jsonl");
        fdpo_core::write_atomic(&prefs, lines.as_bytes())
            .map_err(|e| TrainError::Io { path: prefs.clone(), source: e })?;
        let file = round_file(cfg, round, &current, prefs, &dir);
        let train_config = file.validate(&dir.join("(online round)"))?;
        let summary = train_dpo(&train_config, device, false, observer, None)?;
        let Outcome::Finished { model_dir } = summary.outcome else {
            return Err(TrainError::Msg(format!("round {round}: training stopped early")));
        };
        // The pairs trained on (the trainer skips pairs whose responses
        // tokenise empty or equal).
        let total = records.last().expect("round 0").labels + summary.train_data.pairs.len();
        let record = evaluate(cfg, &sampler, judge, &model_dir, round, total)?;
        write_json(&done, &record)?;
        on_round(&record);
        records.push(record);
        write_log(out, &records)?;
    }
    write_log(out, &records)?;
    Ok(records)
}
