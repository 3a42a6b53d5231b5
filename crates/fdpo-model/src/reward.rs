//! The Bradley–Terry reward model: a causal-LM backbone with a scalar head
//! (`score.weight`, no bias) read at the last non-padding token, in the
//! Hugging Face sequence-classification layout with `num_labels = 1`
//! (`LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`,
//! `GPT2ForSequenceClassification`), so that transformers'
//! `AutoModelForSequenceClassification` loads fdpo's reward models and fdpo
//! loads theirs. As in transformers, the score is read at the rightmost
//! position whose id is not `pad_token_id`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::{CausalLm, ModelConfig, ModelError, Weights};

/// A reward model: backbone, head and the padding id that marks the end.
#[derive(Debug)]
pub struct RewardModel {
    backbone: CausalLm,
    score: Tensor,
    pad_id: u32,
}

/// The number of labels a config.json declares (`num_labels`, else the size
/// of `id2label`, else transformers' default 2).
fn num_labels(config: &Value) -> usize {
    config
        .get("num_labels")
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .or_else(|| config.get("id2label").and_then(Value::as_object).map(|m| m.len()))
        .unwrap_or(2)
}

impl RewardModel {
    /// Loads a sequence-classification checkpoint with one label.
    /// `pad_id` is used when config.json has no `pad_token_id`.
    pub fn load(
        dir: &Path,
        pad_id: u32,
        dtype: DType,
        device: &Device,
    ) -> Result<(RewardModel, Weights), ModelError> {
        let path = dir.join("config.json");
        let raw = crate::read_json(&path)?;
        let labels = num_labels(&raw);
        if labels != 1 {
            let declared = raw.get("num_labels").is_some() || raw.get("id2label").is_some();
            let message = if declared {
                format!("a reward model has one label, this checkpoint has {labels}")
            } else {
                // transformers' default of 2 labels: most likely a causal LM.
                "missing, so transformers would read 2 labels; a reward model has one (is this a causal LM? `fdpo reward train --model` makes a reward model from one)".into()
            };
            return Err(ModelError::Config { path, field: "num_labels".into(), message });
        }
        let config = ModelConfig::read(&path)?;
        let mut weights = Weights::load_dir(dir, dtype, device)?;
        config.check_layers(weights.names(), &path)?;
        let backbone = CausalLm::build_backbone(&config, &mut weights)?;
        let score = weights.get("score.weight", &[1, backbone.hidden_size()])?;
        let pad_id = raw.get("pad_token_id").and_then(Value::as_u64).map_or(pad_id, |p| p as u32);
        Ok((RewardModel { backbone, score, pad_id }, weights))
    }

    /// A fresh reward model on a causal LM checkpoint: its decoder, and a
    /// head drawn N(0, 0.02²) from `seed` (transformers' initializer range).
    /// The language-model head is not used and not saved.
    pub fn from_causal_lm(
        dir: &Path,
        pad_id: u32,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<(RewardModel, Weights), ModelError> {
        let config = ModelConfig::read(&dir.join("config.json"))?;
        let mut weights = Weights::load_dir(dir, dtype, device)?;
        config.check_layers(weights.names(), &dir.join("config.json"))?;
        let backbone = CausalLm::build_backbone(&config, &mut weights)?;
        let hidden = backbone.hidden_size();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let init: Vec<f32> = (0..hidden)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
                (0.02 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        weights.insert("score.weight", Tensor::from_vec(init, (1, hidden), device)?.to_dtype(dtype)?);
        let score = weights.get("score.weight", &[1, hidden])?;
        weights.drop_unused();
        Ok((RewardModel { backbone, score, pad_id }, weights))
    }

    /// The longest sequence (prompt + response) the model accepts.
    pub fn max_positions(&self) -> usize {
        self.backbone.max_positions()
    }

    /// The padding id that marks where a sequence ends.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Scores (batch,) of right-padded `ids` (batch, seq) u32 with their
    /// attention mask; differentiable.
    pub fn forward(&self, ids: &Tensor, attention: &Tensor) -> Result<Tensor, ModelError> {
        let (b, t) = ids.dims2()?;
        let hidden = self.backbone.forward_hidden(ids, Some(attention), None)?;
        let rows = ids.to_vec2::<u32>()?;
        let last: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (i * t + r.iter().rposition(|&id| id != self.pad_id).unwrap_or(0)) as u32)
            .collect();
        let picked = hidden.reshape((b * t, ()))?.index_select(&Tensor::new(last, ids.device())?, 0)?;
        Ok(picked.matmul(&self.score.t()?)?.squeeze(1)?)
    }

    /// Scores (owners,) of a packed batch's branches, read at each branch's
    /// last token that is not the padding id (as [`RewardModel::forward`]
    /// reads a padded row); differentiable.
    pub fn forward_packed(&self, batch: &crate::packing::PackedBatch) -> Result<Tensor, ModelError> {
        let hidden = self.backbone.forward_packed(batch)?;
        let ids = batch.ids.flatten_all()?.to_vec1::<u32>()?;
        let positions = batch.positions.flatten_all()?.to_vec1::<u32>()?;
        let last: Vec<u32> = batch
            .last
            .iter()
            .map(|&at| {
                let mut i = at as usize;
                // Back while the token is padding and the one before is its predecessor.
                while ids[i] == self.pad_id && positions[i] > 0 && positions[i - 1] + 1 == positions[i] {
                    i -= 1;
                }
                i as u32
            })
            .collect();
        let n = last.len();
        let picked = hidden
            .reshape(((), self.backbone.hidden_size()))?
            .index_select(&Tensor::from_vec(last, n, hidden.device())?, 0)?;
        Ok(picked.matmul(&self.score.t()?)?.squeeze(1)?)
    }

    /// Scores of (prompt ids, response ids) pairs, concatenated and padded on
    /// the right with the padding id.
    pub fn score(&self, pairs: &[(Vec<u32>, Vec<u32>)], device: &Device) -> Result<Vec<f64>, ModelError> {
        if pairs.is_empty() {
            return Ok(vec![]);
        }
        let refs: Vec<(&[u32], &[u32])> = pairs.iter().map(|(p, r)| (p.as_slice(), r.as_slice())).collect();
        let batch = crate::logprobs::PaddedBatch::new(&refs, self.pad_id, false, device)?;
        let scores = self.forward(&batch.ids, &batch.attention)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(scores)
    }
}

/// The sequence-classification class of a config's `model_type`.
fn classification_architecture(model_type: &str) -> &'static str {
    match model_type {
        "gpt2" => "GPT2ForSequenceClassification",
        "qwen2" => "Qwen2ForSequenceClassification",
        "mistral" => "MistralForSequenceClassification",
        _ => "LlamaForSequenceClassification",
    }
}

/// Writes a reward model in the sequence-classification layout: the
/// variables (backbone and `score.weight`; a GPT-2 backbone under
/// `transformer.`), config.json from `source` with the architecture,
/// `num_labels = 1`, `id2label` and `pad_token_id` set, and the tokenizer
/// files; every file atomically.
pub fn save_reward_model(
    weights: &Weights,
    model: &RewardModel,
    source: &Path,
    out: &Path,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    let mut config = crate::read_json(&source.join("config.json"))?;
    let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
    let gpt2 = model_type == "gpt2";
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in weights.vars() {
        let key = if gpt2 && name != "score.weight" && !name.starts_with("transformer.") {
            format!("transformer.{name}")
        } else {
            name.clone()
        };
        tensors.insert(key, var.as_tensor().detach().contiguous()?);
    }
    let obj = config.as_object_mut().ok_or_else(|| ModelError::Config {
        path: source.join("config.json"),
        field: "(json)".into(),
        message: "not an object".into(),
    })?;
    obj.insert("architectures".into(), json!([classification_architecture(&model_type)]));
    obj.insert("num_labels".into(), json!(1));
    obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
    obj.insert("label2id".into(), json!({"LABEL_0": 0}));
    obj.insert("pad_token_id".into(), json!(model.pad_id));
    obj.insert("problem_type".into(), json!("regression"));
    let target = out.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| ModelError::Candle(candle_core::Error::Msg(format!("{}: {e}", target.display()))))?;
    fdpo_core::write_atomic(&target, &bytes).map_err(|e| ModelError::io(&target, e))?;
    let config_path = out.join("config.json");
    fdpo_core::write_atomic(&config_path, serde_json::to_string_pretty(&config).expect("json").as_bytes())
        .map_err(|e| ModelError::io(&config_path, e))?;
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
    {
        let from = source.join(name);
        if from.exists() && source != out {
            let bytes = std::fs::read(&from).map_err(|e| ModelError::io(&from, e))?;
            let to = out.join(name);
            fdpo_core::write_atomic(&to, &bytes).map_err(|e| ModelError::io(&to, e))?;
        }
    }
    Ok(())
}
