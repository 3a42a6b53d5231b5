//! BERT encoders for the evaluation suite (sentence embeddings, e.g.
//! all-MiniLM-L6-v2): word + position + token-type embeddings, post-LayerNorm
//! blocks with bidirectional attention, GELU (erf). Keys as transformers saves
//! `BertModel` (`embeddings.word_embeddings.weight`, `encoder.layer.{i}...`),
//! or under a `bert.` prefix (`BertFor...` heads). Inference only; built
//! from the same differentiable ops as the causal models.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear};
use serde::Deserialize;

use crate::layers::attention;
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
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn new(w: &mut Weights, name: &str, size: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(LayerNorm {
            weight: w.get(&format!("{name}.weight"), &[size])?,
            bias: w.get(&format!("{name}.bias"), &[size])?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
    }
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
        let prefix = if weights.contains("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
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
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "{t} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let positions = Tensor::arange(0u32, t as u32, ids.device())?;
        let types = Tensor::zeros((b, t), DType::U32, ids.device())?;
        let x = self
            .word_embeddings
            .forward(ids)?
            .broadcast_add(&self.position_embeddings.forward(&positions)?)?
            .add(&self.token_type_embeddings.forward(&types)?)?;
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
