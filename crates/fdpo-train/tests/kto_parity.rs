//! `fdpo kto` against TRL 1.16's KTOTrainer on the same unpaired data,
//! models and settings: token ids (prompt, completion, and the mismatched
//! completion of the KL term), and the first logged loss, `kl`, rewards and
//! log-probs for `kto` and `apo_zero_unpaired`, equal and unequal weights,
//! plain and conversational data (ChatML and Llama 3 templates), JSONL and
//! Parquet, and a paired file unpaired as TRL does it. The expected numbers
//! come from tests/fixtures/trl_kto/make_kto_fixtures.py.

use std::path::{Path, PathBuf};

use candle_core::Device;
use fdpo_model::TextTokenizer;
use fdpo_train::config::{parse_config, KtoKeys};
use fdpo_train::kto::{read_unpaired, train_kto};
use fdpo_train::trainer::Quiet;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_kto")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol * want.abs().max(1.0), "{what}: fdpo {got}, TRL {want}");
}

/// The data paths of a case: its JSONL file, and its Parquet snapshot.
fn inputs(case: &Value) -> Vec<PathBuf> {
    let mut paths = vec![fixtures().join(case["data"].as_str().unwrap())];
    if let Some(p) = case["parquet"].as_str() {
        // The snapshot folder: data/train-00000-of-00001.parquet inside it.
        paths.push(fixtures().join(p.split('/').next().unwrap()));
    }
    paths
}

#[test]
fn token_ids_and_mismatched_pairs_equal_trls() {
    for (i, case) in expected()["kto"].as_array().unwrap().iter().enumerate() {
        let tok = TextTokenizer::load(&fixtures().join(case["policy"].as_str().unwrap())).unwrap();
        let chunk = case["config"]["per_device_train_batch_size"].as_u64().unwrap() as usize;
        for path in inputs(case) {
            let data = read_unpaired(&path, "train", &tok, 256, chunk).unwrap();
            let what = format!("case {i} from {}", path.display());
            let col = |f: fn(&fdpo_train::kto::UnpairedExample) -> &Vec<u32>| -> Vec<Vec<u32>> {
                data.examples.iter().map(|e| f(e).clone()).collect()
            };
            assert_eq!(col(|e| &e.prompt), ids(&case["prompt_ids"]), "prompts, {what}");
            assert_eq!(col(|e| &e.completion), ids(&case["completion_ids"]), "completions, {what}");
            // apo_zero_unpaired has no KL term, and TRL builds no KL column for it.
            if !case["KL_completion_ids"].is_null() {
                assert_eq!(
                    col(|e| &e.kl_completion),
                    ids(&case["KL_completion_ids"]),
                    "KL completions, {what}"
                );
            }
            let labels: Vec<bool> = data.examples.iter().map(|e| e.label).collect();
            let want: Vec<bool> =
                case["label"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect();
            assert_eq!(labels, want, "labels, {what}");
        }
    }
}

/// One batch holds every example, so the first step's loss and kl do not
/// depend on the order the batch is drawn in.
#[test]
fn first_step_loss_and_metrics_equal_trls() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (i, case) in expected()["kto"].as_array().unwrap().iter().enumerate() {
        let cfg = &case["config"];
        let batch = cfg["per_device_train_batch_size"].as_u64().unwrap() as usize;
        if batch != case["label"].as_array().unwrap().len() {
            continue; // several batches: the first depends on the data order
        }
        for (k, path) in inputs(case).iter().enumerate() {
            let out = dir.path().join(format!("run-{i}-{k}"));
            let mut text = format!(
                "model = {:?}\nref_model = {:?}\ntrain_file = {path:?}\noutput_dir = {out:?}\n\
                 per_device_train_batch_size = {batch}\nmax_steps = 1\nlogging_steps = 1\nlearning_rate = 1e-3\n\
                 max_length = 256\nbeta = {}\nloss_type = {}\n",
                fixtures().join(case["policy"].as_str().unwrap()),
                fixtures().join(case["model"].as_str().unwrap()),
                cfg["beta"],
                cfg["loss_type"],
            );
            for key in ["desirable_weight", "undesirable_weight"] {
                if let Some(v) = cfg.get(key) {
                    text.push_str(&format!("{key} = {v}\n"));
                }
            }
            let config = parse_config::<KtoKeys>(&text, Path::new("kto.toml")).unwrap();
            train_kto(&config, &Device::Cpu, false, &mut Quiet, None).unwrap();
            let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
            let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
            let what = format!(
                "case {i} ({} {} {}) from {}",
                case["policy"],
                case["data"],
                cfg["loss_type"],
                path.display()
            );
            close(
                first["loss"].as_f64().unwrap(),
                case["loss"].as_f64().unwrap(),
                1e-5,
                &format!("loss, {what}"),
            );
            close(
                first["kl"].as_f64().unwrap(),
                case["metrics"]["kl"].as_f64().unwrap(),
                1e-4,
                &format!("kl, {what}"),
            );
            for key in
                ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
            {
                close(
                    first[key].as_f64().unwrap(),
                    case["metrics"][key].as_f64().unwrap(),
                    1e-4,
                    &format!("{key}, {what}"),
                );
            }
            let labels = case["label"].as_array().unwrap();
            let desirable = labels.iter().filter(|x| x.as_bool().unwrap()).count();
            assert_eq!(first["count/desirable"].as_f64(), Some(desirable as f64), "{what}");
            checked += 1;
        }
    }
    assert_eq!(checked, 42, "20 cases from JSONL and Parquet, 2 paired files");
}
