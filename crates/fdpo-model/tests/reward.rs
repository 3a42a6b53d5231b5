//! The reward model against transformers' LlamaForSequenceClassification on
//! a committed fixture (tests/fixtures/make_reward_fixture.py), and fdpo's
//! saved layout read back.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use fdpo_model::reward::{save_reward_model, RewardModel};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("llama-reward/expected.json")).unwrap()).unwrap()
}

fn rows(e: &Value) -> Vec<Vec<u32>> {
    e["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect()
}

fn scores_of(model: &RewardModel, rows: &[Vec<u32>]) -> (Vec<f64>, Vec<f64>) {
    let one: Vec<f64> =
        rows.iter().map(|r| model.score(&[(vec![], r.clone())], &Device::Cpu).unwrap()[0]).collect();
    let batch: Vec<(Vec<u32>, Vec<u32>)> = rows.iter().map(|r| (vec![], r.clone())).collect();
    (one, model.score(&batch, &Device::Cpu).unwrap())
}

fn close(a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5 * y.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

#[test]
fn scores_match_transformers_and_survive_a_save() {
    let e = expected();
    let want: Vec<f64> = e["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let want_batch: Vec<f64> =
        e["batch_scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let (model, weights) = RewardModel::load(&fixture("llama-reward"), 0, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.pad_id(), 3, "pad_token_id comes from config.json");
    let (one, batch) = scores_of(&model, &rows(&e));
    close(&one, &want);
    close(&batch, &want_batch);
    // Every parameter, head included, gets a gradient.
    let ids = Tensor::new(rows(&e)[0].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mask = ids.ones_like().unwrap().to_dtype(DType::U8).unwrap();
    let grads = model.forward(&ids, &mask).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in weights.vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        assert!(
            g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
            "{name}: zero gradient"
        );
    }
    // Saved by fdpo, read back by fdpo: the same scores and the HF layout.
    let dir = std::env::temp_dir().join(format!("fdpo-reward-{}", std::process::id()));
    save_reward_model(&weights, &model, &fixture("llama-reward"), &dir).unwrap();
    let (again, _) = RewardModel::load(&dir, 0, DType::F32, &Device::Cpu).unwrap();
    close(&scores_of(&again, &rows(&e)).0, &want);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!((config["num_labels"].as_u64(), config["pad_token_id"].as_u64()), (Some(1), Some(3)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_causal_lm_becomes_a_reward_model_without_its_lm_head() {
    let (model, weights) =
        RewardModel::from_causal_lm(&fixture("llama"), 3, 7, DType::F32, &Device::Cpu).unwrap();
    let dir = std::env::temp_dir().join(format!("fdpo-reward-causal-{}", std::process::id()));
    save_reward_model(&weights, &model, &fixture("llama"), &dir).unwrap();
    let saved = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.contains_key("score.weight") && saved.contains_key("model.norm.weight"));
    assert!(!saved.contains_key("lm_head.weight"), "the LM head is not part of a reward model");
    let (again, _) = RewardModel::load(&dir, 0, DType::F32, &Device::Cpu).unwrap();
    let pair = [(vec![1u32, 40, 41], vec![42u32, 2])];
    assert_eq!(model.score(&pair, &Device::Cpu).unwrap(), again.score(&pair, &Device::Cpu).unwrap());
    // A checkpoint with two labels is refused by field.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["num_labels"] = 2.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let e = RewardModel::load(&dir, 0, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("field `num_labels`: a reward model has one label, this checkpoint has 2"), "{e}");
    // A causal LM's config.json says nothing of labels.
    let e = RewardModel::load(&fixture("llama"), 0, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("field `num_labels`: missing, so transformers would read 2 labels"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
