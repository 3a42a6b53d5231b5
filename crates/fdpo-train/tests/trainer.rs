//! The trainers on the tiny Llama fixture: f-DPO lowers the loss and learns
//! the preferences, a stopped run resumes to a bit-identical model,
//! non-finite steps are skipped and then stop the run, SFT learns its data.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fdpo_model::{CausalLm, TextTokenizer};
use fdpo_train::config::{parse_config, DpoKeys, SftKeys, TrainConfig};
use fdpo_train::dpo::{train_dpo, DpoObjective, PreferenceSplit};
use fdpo_train::loss::LossConfig;
use fdpo_train::reference::{CacheStatus, ReferenceLogps};
use fdpo_train::sft::{read_sft, train_sft};
use fdpo_train::trainer::{last_checkpoint, Observer, Outcome, Quiet, TrainError, Trainer};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures/llama")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fdpo-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const PAIRS: &str = r#"{"prompt": "the film", "chosen": " was good", "rejected": " was bad"}
{"prompt": "a story", "chosen": " so good", "rejected": " so bad"}
{"prompt": "the plot", "chosen": " is good", "rejected": " is dull"}
{"prompt": "my day", "chosen": " went well", "rejected": " went badly"}
{"prompt": "the cast", "chosen": " shines", "rejected": " fails"}
{"prompt": "its music", "chosen": " is lovely", "rejected": " is awful"}
"#;

fn config(dir: &Path, extra: &str) -> TrainConfig {
    std::fs::write(dir.join("prefs.jsonl"), PAIRS).unwrap();
    let text = format!(
        "model = {:?}\ntrain_file = {:?}\noutput_dir = {:?}\nmax_length = 64\nmax_prompt_length = 32\n{extra}",
        fixture(),
        dir.join("prefs.jsonl"),
        dir.join("run")
    );
    let path = dir.join("run.toml");
    parse_config::<DpoKeys>(&text, &path).unwrap()
}

fn records(run: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap().as_object().unwrap().clone())
        .collect()
}

#[test]
fn dpo_lowers_the_loss_and_learns_the_preferences() {
    let dir = temp_dir("learns");
    let c = config(
        &dir,
        "learning_rate = 0.01\nmax_steps = 25\nper_device_train_batch_size = 3\nlogging_steps = 1\n\
         beta = 0.5\nf_divergence_type = \"js_divergence\"\nlr_scheduler_type = \"constant\"\n",
    );
    let mut eval = c.clone();
    eval.eval_file = Some(c.train_file.clone());
    let summary = train_dpo(&eval, &Device::Cpu, false, &mut Quiet, None).unwrap();
    assert_eq!(summary.cache, Some(CacheStatus::Computed));
    let run = dir.join("run");
    let log = records(&run);
    // Policy = reference at step 1: every reward 0 and the loss log 2.
    let first = &log[0];
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "{first:?}");
    assert!(first["rewards/margins"].as_f64().unwrap().abs() < 1e-5);
    for key in [
        "rewards/chosen",
        "f_rewards/accuracies",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
        "tokens_per_s",
    ] {
        assert!(first[key].as_f64().is_some_and(f64::is_finite), "{key} in {first:?}");
    }
    let last = log.last().unwrap();
    assert_eq!(last["step"], 25);
    assert!(last["eval_loss"].as_f64().unwrap() < 0.4, "{last:?}");
    assert!(last["eval_rewards/accuracies"].as_f64().unwrap() > 0.99, "{last:?}");
    assert!(last["eval_rewards/margins"].as_f64().unwrap() > 0.5, "{last:?}");
    let Outcome::Finished { model_dir } = summary.outcome else { panic!("not finished") };
    assert!(model_dir.join("model.safetensors").exists() && model_dir.join("tokenizer.json").exists());
    // The resolved configuration reads back to what ran.
    let path = run.join("config.toml");
    let again = TrainConfig::read_run(&path).unwrap();
    assert_eq!(again, eval);
    // A second run with the same reference and data reuses the cache.
    let mut rerun = eval.clone();
    rerun.max_steps = Some(1);
    rerun.overwrite_output_dir = true;
    assert_eq!(
        train_dpo(&rerun, &Device::Cpu, false, &mut Quiet, None).unwrap().cache,
        Some(CacheStatus::Reused)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stopped_run_resumes_to_the_identical_model() {
    let extra = "learning_rate = 0.003\nmax_steps = 6\nsave_steps = 2\nper_device_train_batch_size = 2\n\
                 gradient_accumulation_steps = 2\nwarmup_steps = 2\nlr_scheduler_type = \"cosine\"\n\
                 weight_decay = 0.1\nlogging_steps = 1\nf_divergence_type = \"alpha:0.3\"\nsft_weight = 0.2\n";
    let whole = temp_dir("whole");
    let c = config(&whole, extra);
    train_dpo(&c, &Device::Cpu, false, &mut Quiet, None).unwrap();
    let split = temp_dir("split");
    let c2 = config(&split, extra);
    let stopped = train_dpo(&c2, &Device::Cpu, false, &mut Quiet, Some(3)).unwrap();
    assert_eq!(stopped.outcome, Outcome::Stopped { step: 3 });
    let run = split.join("run");
    assert_eq!(last_checkpoint(&run).unwrap().0, 2);
    // A half-written checkpoint (no trainer_state.json) and a temporary one are ignored.
    std::fs::create_dir_all(run.join("checkpoints/step-5")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/.tmp-step-4")).unwrap();
    assert_eq!(last_checkpoint(&run).unwrap().0, 2);
    let resumed = train_dpo(&c2, &Device::Cpu, true, &mut Quiet, None).unwrap();
    assert_eq!(resumed.resumed_from, Some(2));
    assert_eq!(resumed.cache, Some(CacheStatus::Reused));
    let a = std::fs::read(whole.join("run/final/model.safetensors")).unwrap();
    let b = std::fs::read(run.join("final/model.safetensors")).unwrap();
    assert!(a == b, "resumed model differs from the uninterrupted one");
    // The log is the uninterrupted run's, step by step (step 3 logged once).
    let (la, lb) = (records(&whole.join("run")), records(&run));
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!((x["step"].clone(), x["loss"].clone()), (y["step"].clone(), y["loss"].clone()));
    }
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&split).unwrap();
}

/// A new run never mixes with an earlier one in its output_dir: it is
/// refused (naming the last checkpoint and --resume) unless
/// overwrite_output_dir is set; a start that fails on its inputs writes
/// nothing; save_total_limit keeps only the newest checkpoints.
#[test]
fn a_used_output_dir_is_refused_unless_overwritten() {
    let dir = temp_dir("used");
    let run = dir.join("run");
    let a = config(
        &dir,
        "max_steps = 4\nsave_steps = 1\nsave_total_limit = 2\nper_device_train_batch_size = 2\n",
    );
    train_dpo(&a, &Device::Cpu, false, &mut Quiet, None).unwrap();
    let mut kept: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-3", "step-4"]);
    let config_a = std::fs::read(run.join("config.toml")).unwrap();

    let mut b = a.clone();
    b.beta = 0.5;
    let e = train_dpo(&b, &Device::Cpu, false, &mut Quiet, None).unwrap_err().to_string();
    assert!(e.contains("already holds a run") && e.contains("last checkpoint: step 4"), "{e}");
    assert!(e.contains(&format!("--resume {}", run.display())), "{e}");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config_a);

    // Overwriting, but the data file is broken: the error names the line
    // and the old run is untouched.
    let broken = dir.join("broken.jsonl");
    std::fs::write(&broken, format!("{}\n{{\"prompt\": \"x\",\n", PAIRS.lines().next().unwrap())).unwrap();
    b.overwrite_output_dir = true;
    let mut bad = b.clone();
    bad.train_file = broken;
    let e = train_dpo(&bad, &Device::Cpu, false, &mut Quiet, None).unwrap_err().to_string();
    assert!(e.contains("broken.jsonl:2"), "{e}");
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config_a);
    assert!(run.join("checkpoints/step-4").exists());

    // Overwriting, but no pair is usable (all identical): the trainer
    // refuses before the folder is touched.
    let identical = dir.join("identical.jsonl");
    std::fs::write(&identical, "{\"prompt\": \"x\", \"chosen\": \" a\", \"rejected\": \" a\"}\n").unwrap();
    bad.train_file = identical;
    assert!(train_dpo(&bad, &Device::Cpu, false, &mut Quiet, None).is_err());
    assert_eq!(std::fs::read(run.join("config.toml")).unwrap(), config_a);
    assert!(run.join("checkpoints/step-4").exists());
    // Overwriting would delete the model this run starts from: refused.
    let mut inside = b.clone();
    inside.model = run.join("checkpoints/step-4");
    let e = train_dpo(&inside, &Device::Cpu, false, &mut Quiet, None).unwrap_err().to_string();
    assert!(e.contains("overwrite_output_dir would delete") && e.contains("which this run reads"), "{e}");

    b.max_steps = Some(1);
    b.save_steps = 100;
    train_dpo(&b, &Device::Cpu, false, &mut Quiet, None).unwrap();
    assert!(!run.join("checkpoints/step-3").exists() && !run.join("checkpoints/step-4").exists());
    let path = run.join("config.toml");
    // (overwrite_output_dir is an action, not recorded.)
    assert_eq!(
        TrainConfig::read_run(&path).unwrap(),
        TrainConfig { overwrite_output_dir: false, ..b.clone() }
    );
    assert_eq!(records(&run).iter().filter(|r| r.contains_key("loss")).count(), 1);
    // Other length settings: the reference cache is stale, and says so.
    let mut c = b.clone();
    c.max_length = 48;
    c.warmup_steps = Some(1);
    let mut warnings = Warnings::default();
    let summary = train_dpo(&c, &Device::Cpu, false, &mut warnings, None).unwrap();
    assert!(matches!(summary.cache, Some(CacheStatus::Stale { .. })));
    assert!(
        warnings.0.iter().any(|w| w.contains("reference/train") && w.contains("recomputed")),
        "{:?}",
        warnings.0
    );
    // Limits beyond the fixture's 64 positions are cut to them, with a warning.
    let mut long = c.clone();
    (long.max_length, long.max_prompt_length) = (1024, Some(512));
    let mut cut = Warnings::default();
    let fitted = fdpo_train::trainer::fit_to_context(&long, true, &mut cut).unwrap();
    assert_eq!((fitted.max_length, fitted.max_prompt_length), (64, Some(32)));
    assert!(
        cut.0[0].contains("max_length 1024 is beyond the model's context of 64 positions"),
        "{:?}",
        cut.0
    );
    // One step, all of it warmup: it runs at learning rate 0, and says so.
    assert!(warnings.0.iter().any(|w| w.contains("the only step runs at 0")), "{:?}", warnings.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Records the warnings and the loss shown for each step.
/// save_total_limit prunes the checkpoint a resumed run started from; the
/// later checkpoints and final/ still carry config.json and the tokenizer
/// (copied from the model the run began with) and load.
#[test]
fn a_resumed_run_with_a_checkpoint_limit_saves_loadable_models() {
    let dir = temp_dir("limit");
    let c = config(
        &dir,
        "max_steps = 4\nsave_steps = 1\nsave_total_limit = 1\nper_device_train_batch_size = 2\n",
    );
    train_dpo(&c, &Device::Cpu, false, &mut Quiet, Some(2)).unwrap();
    let run = dir.join("run");
    assert_eq!(last_checkpoint(&run).unwrap().0, 2);
    train_dpo(&c, &Device::Cpu, true, &mut Quiet, None).unwrap();
    assert!(!run.join("checkpoints/step-2").exists());
    for model in [run.join("checkpoints/step-4"), run.join("final")] {
        assert!(model.join("tokenizer.json").exists(), "{}", model.display());
        CausalLm::load(&model, DType::F32, &Device::Cpu).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[derive(Default)]
struct Warnings(Vec<String>, Vec<f64>);

impl Observer for Warnings {
    fn warn(&mut self, message: &str) {
        self.0.push(message.to_string());
    }

    fn step(&mut self, _step: usize, loss: f64, _tokens_per_s: f64) {
        self.1.push(loss);
    }
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run_with_a_checkpoint() {
    let dir = temp_dir("nan");
    let mut c = config(
        &dir,
        "max_steps = 8\nper_device_train_batch_size = 2\nmax_nonfinite_steps = 3\nlearning_rate = 0.01\n",
    );
    c.output_dir = dir.join("run");
    let tokenizer = TextTokenizer::load(&fixture()).unwrap();
    let limits = fdpo_train::data::Limits {
        max_length: 64,
        max_prompt_length: Some(32),
        truncation: fdpo_train::data::Truncation::KeepEnd,
    };
    let pairs =
        fdpo_train::data::read_preferences(&c.train_file, "train", &tokenizer, &limits).unwrap().pairs;
    let (model, weights) = CausalLm::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let before = weights.current().unwrap()["model.norm.weight"].to_vec1::<f32>().unwrap();
    // A NaN reference for every pair: every step is non-finite.
    let n = pairs.len();
    let train = PreferenceSplit {
        pairs,
        reference: ReferenceLogps { chosen: vec![f64::NAN; n], rejected: vec![0.0; n] },
    };
    let empty = PreferenceSplit::default();
    let objective = DpoObjective {
        model: &model,
        loss: LossConfig {
            divergence: c.divergence,
            loss_type: c.loss_type,
            beta: c.beta,
            label_smoothing: 0.0,
            reference_free: false,
        },
        sft_weight: 0.0,
        train: &train,
        eval: &empty,
        pad_id: tokenizer.pad_id(),
        batching: c.batching,
        device: Device::Cpu,
    };
    let mut trainer = Trainer::new(&c, &weights, &fixture(), n).unwrap();
    let mut warnings = Warnings::default();
    let err = trainer.run(&objective, &mut warnings, None).unwrap_err();
    assert_eq!(warnings.0.len(), 3, "{:?}", warnings.0);
    // A skipped step is shown as NaN, not as a loss of 0.
    // (The third, fatal one ends the run before it is shown.)
    assert!(warnings.1.len() == 2 && warnings.1.iter().all(|l| l.is_nan()), "{:?}", warnings.1);
    assert!(warnings.0[0].contains("step 1: non-finite loss or gradient, step skipped"), "{:?}", warnings.0);
    let TrainError::NonFinite { step, count, checkpoint } = &err else { panic!("{err}") };
    assert_eq!((*step, *count), (3, 3));
    assert!(err.to_string().contains("3 steps in a row had a non-finite loss"), "{err}");
    assert!(checkpoint.join("trainer_state.json").exists());
    // metrics.jsonl ends with the fatal window: its skipped steps, no loss.
    let metrics = std::fs::read_to_string(c.output_dir.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!((last["step"].as_u64(), last["skipped_steps"].as_u64()), (Some(3), Some(3)), "{last}");
    assert!(["loss", "grad_norm", "tokens_per_s"].iter().all(|k| last.get(k).is_none()), "{last}");
    // Nothing was applied.
    let after = weights.current().unwrap()["model.norm.weight"].to_vec1::<f32>().unwrap();
    assert_eq!(before, after);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sft_reads_every_form_and_learns_its_completions() {
    let dir = temp_dir("sft");
    let tokenizer = TextTokenizer::load(&fixture()).unwrap();
    let data = dir.join("sft.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"the film\", \"completion\": \" was good\"}\n\
         {\"text\": \"a good story\"}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"good\"}]}\n\
         {\"prompt\": \"x\", \"completion\": \"  \"}\n\
         {\"prompt\": \"the plot\", \"completion\": \" is good and long enough to be cut somewhere after forty tokens of text\"}\n",
    )
    .unwrap();
    let read = read_sft(&data, "train", &tokenizer, 40).unwrap();
    assert_eq!(read.examples.len(), 4);
    assert_eq!((read.skipped_empty, read.truncated), (1, 1));
    let first = &read.examples[0];
    // TRL's rule: prompt + completion encoded whole with EOS, cut after the prompt.
    assert_eq!(
        [first.prompt.clone(), first.completion.clone()].concat(),
        tokenizer.encode("the film was good</s>", true).unwrap()
    );
    assert!(tokenizer.encode("the film", true).unwrap().starts_with(&first.prompt));
    assert!(read.examples[1].prompt.is_empty());
    // A conversation is learned whole, as rendered by the template.
    let chat = &read.examples[2];
    let hi = ["user", "assistant"].map(|role| fdpo_model::ChatMessage {
        role: role.into(),
        content: if role == "user" { "hi" } else { "good" }.into(),
    });
    let rendered = tokenizer.apply_chat_template(&hi, false).unwrap();
    assert!(chat.prompt.is_empty());
    assert_eq!(chat.completion, tokenizer.encode(&rendered, false).unwrap());
    assert!(read.examples[3].prompt.len() + read.examples[3].completion.len() <= 40);
    // Errors name file, line and field.
    std::fs::write(&data, "{\"prompt\": \"a\"}\n").unwrap();
    let e = read_sft(&data, "train", &tokenizer, 12).unwrap_err().to_string();
    assert!(e.ends_with("sft.jsonl:1: field `completion`: missing"), "{e}");
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": 3}\n").unwrap();
    let e = read_sft(&data, "train", &tokenizer, 12).unwrap_err().to_string();
    assert!(
        e.contains("sft.jsonl:1: field `completion`: invalid type: integer `3`, expected a string"),
        "{e}"
    );

    // Training lowers the loss on the completions.
    std::fs::write(
        &data,
        "{\"prompt\": \"the film\", \"completion\": \" was good\"}\n{\"prompt\": \"a story\", \"completion\": \" so good\"}\n",
    )
    .unwrap();
    let text = format!(
        "model = {:?}\ntrain_file = {:?}\neval_file = {:?}\noutput_dir = {:?}\nlearning_rate = 0.01\nmax_steps = 20\n\
         logging_steps = 1\nper_device_train_batch_size = 2\n",
        fixture(),
        data,
        data,
        dir.join("run")
    );
    let path = dir.join("sft.toml");
    let c = parse_config::<SftKeys>(&text, &path).unwrap();
    train_sft(&c, &Device::Cpu, false, &mut Quiet, None).unwrap();
    let log = records(&dir.join("run"));
    let first = log[0]["loss"].as_f64().unwrap();
    let last = log.last().unwrap()["eval_loss"].as_f64().unwrap();
    assert!(first > 3.0 && last < 0.5 * first, "first {first}, eval after {last}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The largest relative difference between two runs' logged metrics
/// (timing keys aside), and the key where it is.
fn metrics_difference(a: &Path, b: &Path) -> (f64, String) {
    let (a, b) = (records(a), records(b));
    assert_eq!(a.len(), b.len());
    let mut worst = (0.0, String::new());
    for (ra, rb) in a.iter().zip(&b) {
        for (key, va) in ra {
            // At step 1 the policy is its reference: the margins are 0 in a
            // padded run and ±1e-7 (another summation order) in a packed
            // one, so the share of positive margins is a coin toss there.
            let tie = key.ends_with("accuracies") && ra["step"] == 1;
            if tie || ["tokens_per_s", "seconds", "elapsed_s"].contains(&key.as_str()) {
                continue;
            }
            let (Some(x), Some(y)) = (va.as_f64(), rb.get(key).and_then(Value::as_f64)) else {
                assert_eq!(Some(va), rb.get(key), "{key}");
                continue;
            };
            // A margin is a difference: measured on the scale of its terms.
            let terms = ["chosen", "rejected"].map(|side| {
                ra.get(&key.replace("margins", side)).and_then(Value::as_f64).unwrap_or(0.0).abs()
            });
            let diff = (x - y).abs() / x.abs().max(y.abs()).max(terms[0]).max(terms[1]).max(1.0);
            if diff > worst.0 {
                worst = (diff, format!("{key} at step {}: {x} vs {y}", ra["step"]));
            }
        }
    }
    worst
}

/// f-DPO (with the SFT term), SFT (completion-only and whole-text) and
/// the reward model log the same metrics — losses, rewards, log-probs,
/// gradient norms — from packed micro-batches with shared prompts, packed
/// ones without, and padded ones, on pairs of uneven lengths.
#[test]
fn packed_and_padded_runs_log_the_same_metrics() {
    let dir = temp_dir("packed");
    let (pairs, sft) = (dir.join("uneven.jsonl"), dir.join("sft.jsonl"));
    std::fs::write(
        &pairs,
        r#"{"prompt": "a", "chosen": " good", "rejected": " bad, and then it went on and on about nothing at all"}
{"prompt": "the long opening of a story that goes on for a while before it asks", "chosen": " yes", "rejected": " no"}
{"prompt": "my day", "chosen": " went well enough, all things considered, thank you", "rejected": " badly"}
{"prompt": "the cast", "chosen": " shines", "rejected": " fails"}
{"prompt": "its music, its light and its long quiet scenes", "chosen": " are lovely to see", "rejected": " bore"}
{"prompt": "so", "chosen": " fine", "rejected": " dull and slow and far too long for what it has to say"}
"#,
    )
    .unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&pairs)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["prompt"], "completion": v["chosen"]}).to_string()
        })
        .collect();
    std::fs::write(&sft, lines.join("\n")).unwrap();
    let common = "learning_rate = 0.01\nmax_steps = 4\nper_device_train_batch_size = 3\nlogging_steps = 1\n\
                  lr_scheduler_type = \"constant\"\n";
    let layouts =
        [("padded", "padding_free = false\n"), ("apart", "prefix_sharing = false\n"), ("shared", "")];
    let mut runs: Vec<(&str, &str, PathBuf)> = vec![];
    for (name, layout) in layouts {
        let mut c = config(&dir, &format!("{common}beta = 0.5\nsft_weight = 0.3\n{layout}"));
        c.output_dir = dir.join(format!("dpo-{name}"));
        c.train_file = pairs.clone();
        train_dpo(&c, &Device::Cpu, false, &mut Quiet, None).unwrap();
        runs.push(("dpo", name, c.output_dir.clone()));
        for whole in [true, false] {
            let text = format!(
                "model = {:?}\ntrain_file = {:?}\noutput_dir = {:?}\ncompletion_only_loss = {}\n{common}{layout}",
                fixture(),
                sft,
                dir.join(format!("sft-{whole}-{name}")),
                !whole
            );
            let c = parse_config::<SftKeys>(&text, &dir.join("sft.toml")).unwrap();
            train_sft(&c, &Device::Cpu, false, &mut Quiet, None).unwrap();
            runs.push(if whole { ("sft whole", name, c.output_dir) } else { ("sft", name, c.output_dir) });
        }
        let text = format!(
            "model = {:?}\ntrain_file = {:?}\noutput_dir = {:?}\n{common}{layout}",
            fixture(),
            pairs,
            dir.join(format!("reward-{name}")),
        );
        let c = parse_config::<fdpo_train::config::RewardKeys>(&text, &dir.join("reward.toml")).unwrap();
        fdpo_train::reward::train_reward(&c, &Device::Cpu, false, &mut Quiet, None).unwrap();
        runs.push(("reward", name, c.output_dir));
    }
    for (what, name, run) in &runs {
        if *name == "padded" {
            continue;
        }
        let (_, _, padded) = runs.iter().find(|(w, n, _)| w == what && *n == "padded").unwrap();
        let (diff, at) = metrics_difference(run, padded);
        assert!(diff < 1e-5, "{what}, {name} against padded: {diff:e} ({at})");
        eprintln!("{what}, {name}: largest relative difference {diff:.1e} ({at})");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
