//! BERT and RoBERTa encoders for the evaluation suite (sentence
//! embeddings, e.g. all-MiniLM-L6-v2; NLI classifiers with BERT's pooler or
//! RoBERTa's classification head): word + position + token-type embeddings,
//! post-LayerNorm blocks with bidirectional attention, GELU (erf). Keys as transformers saves
//! `BertModel` (`embeddings.word_embeddings.weight`, `encoder.layer.{i}...`),
//! or under a `bert.` prefix (`BertFor...` heads). Inference only; built
//! from the same differentiable ops as the causal models.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear};
use serde::Deserialize;

use crate::attention::attention;
use crate::layers::LayerNorm;
use crate::{ModelError, Weights};

/// config.json of a BERT model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Learned positions.
    pub max_position_embeddings: usize,
    /// Token types.
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// LayerNorm ε.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Activation (only "gelu", the erf form, is supported).
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// `bert` or `roberta` (RoBERTa numbers positions from pad_token_id + 1).
    #[serde(default = "bert_type")]
    pub model_type: String,
    /// Padding id (RoBERTa's position offset).
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn bert_type() -> String {
    "bert".into()
}

fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

fn linear(w: &mut Weights, name: &str, out: usize, inp: usize) -> Result<Linear, ModelError> {
    Ok(Linear::new(
        w.get(&format!("{name}.weight"), &[out, inp])?,
        Some(w.get(&format!("{name}.bias"), &[out])?),
    ))
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A BERT encoder.
#[derive(Debug)]
pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    config: BertConfig,
}

impl Bert {
    /// Reads config.json of `dir`.
    pub fn read_config(dir: &Path) -> Result<BertConfig, ModelError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.clone(),
            field: "(schema)".into(),
            message: e.to_string(),
        })?;
        if config.model_type != "bert" && config.model_type != "roberta" {
            return Err(ModelError::Unsupported {
                model_type: config.model_type.clone(),
                supported: "bert, roberta (encoders)",
            });
        }
        if config.hidden_act != "gelu" {
            return Err(ModelError::Config {
                path,
                field: "hidden_act".into(),
                message: format!("`{}` is not supported (gelu)", config.hidden_act),
            });
        }
        Ok(config)
    }

    /// Loads config.json and weights of `dir` (keys with or without `bert.`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Bert, ModelError> {
        let config = Self::read_config(dir)?;
        let mut weights = Weights::load_dir(dir, dtype, device)?;
        let prefix = encoder_prefix(&weights, &config);
        Bert::new(&config, &mut weights, prefix)
    }

    /// Builds the encoder from `weights`, keys under `prefix`.
    pub fn new(c: &BertConfig, w: &mut Weights, prefix: &str) -> Result<Bert, ModelError> {
        let h = c.hidden_size;
        let e = |name: &str, rows: usize, w: &mut Weights| -> Result<Embedding, ModelError> {
            Ok(Embedding::new(w.get(&format!("{prefix}embeddings.{name}.weight"), &[rows, h])?, h))
        };
        let word_embeddings = e("word_embeddings", c.vocab_size, w)?;
        let position_embeddings = e("position_embeddings", c.max_position_embeddings, w)?;
        let token_type_embeddings = e("token_type_embeddings", c.type_vocab_size, w)?;
        let embeddings_norm =
            LayerNorm::new(w, &format!("{prefix}embeddings.LayerNorm"), h, c.layer_norm_eps)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("{prefix}encoder.layer.{i}");
                Ok(Layer {
                    query: linear(w, &format!("{p}.attention.self.query"), h, h)?,
                    key: linear(w, &format!("{p}.attention.self.key"), h, h)?,
                    value: linear(w, &format!("{p}.attention.self.value"), h, h)?,
                    attention_output: linear(w, &format!("{p}.attention.output.dense"), h, h)?,
                    attention_norm: LayerNorm::new(
                        w,
                        &format!("{p}.attention.output.LayerNorm"),
                        h,
                        c.layer_norm_eps,
                    )?,
                    intermediate: linear(w, &format!("{p}.intermediate.dense"), c.intermediate_size, h)?,
                    output: linear(w, &format!("{p}.output.dense"), h, c.intermediate_size)?,
                    output_norm: LayerNorm::new(w, &format!("{p}.output.LayerNorm"), h, c.layer_norm_eps)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Bert {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_norm,
            layers,
            config: c.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// ids (b, t) u32 and attention mask (b, t) (1 = token) → hidden states (b, t, hidden).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let types = Tensor::zeros(ids.dims2()?, DType::U32, ids.device())?;
        self.forward_with_types(ids, &types, mask)
    }

    /// As [`Self::forward`], with token-type ids (b, t) (sentence A/B).
    pub fn forward_with_types(
        &self,
        ids: &Tensor,
        types: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let positions = if self.config.model_type == "roberta" {
            // RoBERTa: padding_idx + cumulative count of real tokens; padding at padding_idx.
            let pad = self.config.pad_token_id.unwrap_or(1) as f64;
            let m = mask.to_dtype(DType::F32)?;
            ((m.cumsum(1)? * &m)? + pad)?.to_dtype(DType::U32)?
        } else {
            Tensor::arange(0u32, t as u32, ids.device())?.unsqueeze(0)?.expand((b, t))?.contiguous()?
        };
        let max = positions.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.max_position_embeddings {
            candle_core::bail!(
                "{t} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let x = self
            .word_embeddings
            .forward(ids)?
            .add(&self.position_embeddings.forward(&positions)?)?
            .add(&self.token_type_embeddings.forward(types)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;
        // Bidirectional: only padding keys are masked.
        let keep = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, t))?;
        let additive = ((keep - 1.0)? * 1e9)?.to_dtype(x.dtype())?;
        let (heads, h) = (self.config.num_attention_heads, self.config.hidden_size);
        for layer in &self.layers {
            let split = |y: Tensor| y.reshape((b, t, heads, h / heads))?.transpose(1, 2)?.contiguous();
            let q = split(layer.query.forward(&x)?)?;
            let k = split(layer.key.forward(&x)?)?;
            let v = split(layer.value.forward(&x)?)?;
            let y = attention(&q, &k, &v, &additive)?.transpose(1, 2)?.reshape((b, t, h))?;
            x = layer.attention_norm.forward(&(layer.attention_output.forward(&y)? + &x)?)?;
            let m = layer.output.forward(&layer.intermediate.forward(&x)?.gelu_erf()?)?;
            x = layer.output_norm.forward(&(m + &x)?)?;
        }
        Ok(x)
    }
}

/// The key prefix of the encoder in a checkpoint: `bert.`/`roberta.` for
/// models with a task head, none for bare encoders.
fn encoder_prefix(weights: &Weights, config: &BertConfig) -> &'static str {
    if config.model_type == "roberta" && weights.contains("roberta.embeddings.word_embeddings.weight") {
        "roberta."
    } else if weights.contains("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

/// NLI labels of a sequence-classification head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NliLabels {
    /// Index of "contradiction".
    pub contradiction: usize,
    /// Index of "neutral".
    pub neutral: usize,
    /// Index of "entailment".
    pub entailment: usize,
}

#[derive(Debug)]
enum Head {
    /// BERT: pooler (dense + tanh on [CLS]) then classifier.
    Bert { pooler: Linear, classifier: Linear },
    /// RoBERTa: classifier.dense + tanh + classifier.out_proj on <s>.
    Roberta { dense: Linear, out_proj: Linear },
}

/// A BERT or RoBERTa sequence classifier for natural language inference.
#[derive(Debug)]
pub struct NliClassifier {
    encoder: Bert,
    head: Head,
    /// Where contradiction, neutral and entailment are among the outputs.
    pub labels: NliLabels,
    tokenizer: crate::TextTokenizer,
    device: Device,
}

impl NliClassifier {
    /// Loads a `BertForSequenceClassification` or
    /// `RobertaForSequenceClassification` directory whose `id2label` names
    /// contradiction, neutral and entailment.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config = Bert::read_config(dir)?;
        let path = dir.join("config.json");
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?)
                .map_err(|e| ModelError::Config {
                    path: path.clone(),
                    field: "(json)".into(),
                    message: e.to_string(),
                })?;
        let id2label = raw.get("id2label").and_then(|v| v.as_object()).ok_or_else(|| ModelError::Config {
            path: path.clone(),
            field: "id2label".into(),
            message: "missing: an NLI model names its labels".into(),
        })?;
        let find = |name: &str| {
            id2label
                .iter()
                .find(|(_, v)| v.as_str().is_some_and(|s| s.to_ascii_lowercase().starts_with(name)))
                .and_then(|(k, _)| k.parse::<usize>().ok())
                .ok_or_else(|| ModelError::Config {
                    path: path.clone(),
                    field: "id2label".into(),
                    message: format!("no `{name}` label (need contradiction, neutral, entailment)"),
                })
        };
        let labels = NliLabels {
            contradiction: find("contradiction")?,
            neutral: find("neutral")?,
            entailment: find("entailment")?,
        };
        let n = id2label.len();
        let mut w = Weights::load_dir(dir, DType::F32, device)?;
        let prefix = encoder_prefix(&w, &config);
        let encoder = Bert::new(&config, &mut w, prefix)?;
        let h = config.hidden_size;
        let head = if config.model_type == "roberta" {
            Head::Roberta {
                dense: linear(&mut w, "classifier.dense", h, h)?,
                out_proj: linear(&mut w, "classifier.out_proj", n, h)?,
            }
        } else {
            Head::Bert {
                pooler: linear(&mut w, "bert.pooler.dense", h, h)?,
                classifier: linear(&mut w, "classifier", n, h)?,
            }
        };
        Ok(NliClassifier {
            encoder,
            head,
            labels,
            tokenizer: crate::TextTokenizer::load(dir)?,
            device: device.clone(),
        })
    }

    /// Class probabilities (one row per pair, in `id2label` order) of
    /// (premise, hypothesis) pairs.
    pub fn probabilities(&self, pairs: &[(String, String)]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(16) {
            let encoded: Vec<(Vec<u32>, Vec<u32>)> =
                chunk.iter().map(|(p, h)| self.tokenizer.encode_pair(p, h)).collect::<Result<_, _>>()?;
            let width = encoded.iter().map(|e| e.0.len()).max().unwrap_or(1).max(1);
            let pad = self.tokenizer.pad_id();
            let (mut ids, mut types, mut mask) = (Vec::new(), Vec::new(), Vec::new());
            for (i, t) in &encoded {
                ids.extend(i.iter().copied().chain(std::iter::repeat_n(pad, width - i.len())));
                types.extend(t.iter().copied().chain(std::iter::repeat_n(0, width - t.len())));
                mask.extend((0..width).map(|j| u32::from(j < i.len())));
            }
            let shape = (chunk.len(), width);
            let ids = Tensor::from_vec(ids, shape, &self.device)?;
            let types = Tensor::from_vec(types, shape, &self.device)?;
            let mask = Tensor::from_vec(mask, shape, &self.device)?;
            let hidden = self.encoder.forward_with_types(&ids, &types, &mask)?;
            let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
            let logits = match &self.head {
                Head::Bert { pooler, classifier } => classifier.forward(&pooler.forward(&first)?.tanh()?)?,
                Head::Roberta { dense, out_proj } => out_proj.forward(&dense.forward(&first)?.tanh()?)?,
            };
            out.extend(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// NLI diversity of texts (Stasaski & Hearst 2022): over ordered pairs,
    /// P(contradiction)·1 + P(neutral)·0 + P(entailment)·(−1), averaged (0
    /// for fewer than two texts).
    pub fn diversity(&self, texts: &[String]) -> Result<f64, ModelError> {
        let pairs: Vec<(String, String)> = (0..texts.len())
            .flat_map(|i| (0..texts.len()).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| (texts[i].clone(), texts[j].clone()))
            .collect();
        if pairs.is_empty() {
            return Ok(0.0);
        }
        Ok(aggregate_nli(&self.probabilities(&pairs)?, self.labels))
    }
}

/// Stasaski & Hearst's aggregation: the mean over pairs of
/// P(contradiction)·1 + P(neutral)·0 + P(entailment)·(−1).
///
/// ```
/// use fdpo_model::bert::{aggregate_nli, NliLabels};
/// let labels = NliLabels { contradiction: 0, neutral: 1, entailment: 2 };
/// let probs = vec![vec![0.7, 0.2, 0.1], vec![0.1, 0.3, 0.6]];
/// // (0.7 − 0.1 + 0.1 − 0.6) / 2 = 0.05
/// assert!((aggregate_nli(&probs, labels) - 0.05).abs() < 1e-7);
/// ```
pub fn aggregate_nli(probabilities: &[Vec<f32>], labels: NliLabels) -> f64 {
    if probabilities.is_empty() {
        return 0.0;
    }
    let total: f64 =
        probabilities.iter().map(|p| p[labels.contradiction] as f64 - p[labels.entailment] as f64).sum();
    total / probabilities.len() as f64
}

/// Mean of the hidden states over real tokens: (b, t, h), mask (b, t) → (b, h).
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let m = mask.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let summed = hidden.broadcast_mul(&m)?.sum(1)?;
    summed.broadcast_div(&m.sum(1)?.clamp(1e-9, f64::MAX)?)
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?)
}
