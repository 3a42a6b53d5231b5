//! Model configurations: config.json as Hugging Face transformers writes it
//! (file structs, `Deserialize`), and the resolved configs the models use.
//!
//! transformers ≥ 5 nests `rope_theta` and `rope_scaling` under
//! `rope_parameters`; older files have them at the top level. Both are read,
//! and a Llama-family file with neither is an error rather than a silent
//! default of 10000 (which gives logits off by ~12 on real checkpoints).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::ModelError;

/// The families fdpo can run, by config.json's `model_type`.
pub const SUPPORTED: &str = "llama, mistral (without sliding window), qwen2, gpt2";

/// A resolved model configuration.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// Llama-family decoder (also Mistral and Qwen2).
    Llama(LlamaConfig),
    /// GPT-2.
    Gpt2(Gpt2Config),
}

/// Resolved Llama-family configuration (Llama 2/3, SmolLM, Mistral, Qwen2).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` as read (llama, mistral or qwen2).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm ε.
    pub rms_norm_eps: f64,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// Llama 3 RoPE frequency scaling, when the file asks for it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares `embed_tokens`' weight.
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
}

/// The `llama3` RoPE scaling parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// Overall factor.
    pub factor: f64,
    /// Low-frequency factor.
    pub low_freq_factor: f64,
    /// High-frequency factor.
    pub high_freq_factor: f64,
    /// Context length of the unscaled model.
    pub original_max_position_embeddings: usize,
}

/// Resolved GPT-2 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Learned positions.
    pub n_positions: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// MLP width (4·n_embd when the file has none).
    pub n_inner: usize,
    /// LayerNorm ε.
    pub layer_norm_epsilon: f64,
}

/// config.json of a Llama-family model, as written by transformers.
#[derive(Debug, Deserialize)]
struct LlamaFile {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
}

/// config.json of GPT-2.
#[derive(Debug, Deserialize)]
struct Gpt2File {
    vocab_size: usize,
    n_positions: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_inner: Option<usize>,
    layer_norm_epsilon: f64,
    activation_function: Option<String>,
}

fn field_err(path: &Path, field: &str, message: impl Into<String>) -> ModelError {
    ModelError::Config { path: path.to_path_buf(), field: field.into(), message: message.into() }
}

fn parse_as<T: serde::de::DeserializeOwned>(value: Value, path: &Path) -> Result<T, ModelError> {
    serde_json::from_value(value).map_err(|e| field_err(path, "(schema)", e.to_string()))
}

impl ModelConfig {
    /// Decoder layers (`num_hidden_layers`, GPT-2's `n_layer`).
    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.num_hidden_layers,
            ModelConfig::Gpt2(c) => c.n_layer,
        }
    }

    /// Refuses a checkpoint with layers beyond the config's count (e.g.
    /// config.json edited to fewer layers): building would silently drop
    /// them. `path` is the config.json, for the message.
    pub fn check_layers(
        &self,
        names: impl Iterator<Item = impl AsRef<str>>,
        path: &Path,
    ) -> Result<(), ModelError> {
        let layer = |name: &str| -> Option<usize> {
            ["model.layers.", "transformer.h.", "h."]
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .and_then(|rest| rest.split('.').next()?.parse().ok())
        };
        let layers = self.num_layers();
        let beyond = names.filter_map(|n| layer(n.as_ref()).filter(|&i| i >= layers)).max();
        match beyond {
            Some(last) => Err(ModelError::Config {
                path: path.to_path_buf(),
                field: match self {
                    ModelConfig::Llama(_) => "num_hidden_layers".into(),
                    ModelConfig::Gpt2(_) => "n_layer".into(),
                },
                message: format!("{layers}, but the checkpoint has tensors of layer {last}; the config and the weights disagree"),
            }),
            None => Ok(()),
        }
    }

    /// The longest sequence the model accepts (`max_position_embeddings`,
    /// GPT-2's `n_positions`).
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Llama(c) => c.max_position_embeddings,
            ModelConfig::Gpt2(c) => c.n_positions,
        }
    }

    /// Reads and resolves `config.json` at `path`.
    pub fn read(path: &Path) -> Result<ModelConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Resolves config.json text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<ModelConfig, ModelError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| field_err(path, "(json)", e.to_string()))?;
        // model_type, else the first architecture (e.g. "LlamaForCausalLM").
        let from_architectures = || {
            let arch = value.get("architectures")?.as_array()?.first()?.as_str()?;
            let known = [("Llama", "llama"), ("Mistral", "mistral"), ("Qwen2", "qwen2"), ("GPT2", "gpt2")];
            known
                .iter()
                .find(|(prefix, _)| arch.starts_with(prefix) && arch[prefix.len()..].starts_with("For"))
                .map(|(_, t)| t.to_string())
        };
        let model_type = match value.get("model_type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => from_architectures().unwrap_or_default(),
        };
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => {
                let file: LlamaFile = parse_as(value, path)?;
                file.resolve(&model_type, path).map(ModelConfig::Llama)
            }
            "gpt2" => {
                let file: Gpt2File = parse_as(value, path)?;
                file.resolve(path).map(ModelConfig::Gpt2)
            }
            "" => Err(field_err(
                path,
                "model_type",
                format!("missing (and no known `architectures`); supported: {SUPPORTED}"),
            )),
            other => Err(ModelError::Unsupported { model_type: other.into(), supported: SUPPORTED }),
        }
    }
}

impl LlamaFile {
    fn resolve(self, model_type: &str, path: &Path) -> Result<LlamaConfig, ModelError> {
        let sliding = self.use_sliding_window.unwrap_or(model_type == "mistral")
            && self.sliding_window.as_ref().is_some_and(|v| !v.is_null());
        if sliding {
            return Err(field_err(path, "sliding_window", "sliding-window attention is not supported"));
        }
        // transformers ≥ 5: rope_parameters {rope_theta, rope_type, factor, ...};
        // older: rope_theta and rope_scaling at the top level.
        let params = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let theta = params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64).or(self.rope_theta);
        let rope_theta = theta.ok_or_else(|| {
            field_err(path, "rope_theta", "missing (looked in rope_parameters and at the top level)")
        })?;
        let scaling = params.filter(|p| p.get("rope_type").is_some()).or(self.rope_scaling.as_ref());
        let rope_scaling = match scaling.filter(|v| v.is_object()) {
            None => None,
            Some(s) => {
                let kind = s.get("rope_type").or(s.get("type")).and_then(Value::as_str).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let num = |k: &str| {
                            s.get(k).and_then(Value::as_f64).ok_or_else(|| {
                                field_err(path, &format!("rope_scaling.{k}"), "missing or not a number")
                            })
                        };
                        Some(Llama3RopeScaling {
                            factor: num("factor")?,
                            low_freq_factor: num("low_freq_factor")?,
                            high_freq_factor: num("high_freq_factor")?,
                            original_max_position_embeddings: num("original_max_position_embeddings")?
                                as usize,
                        })
                    }
                    other => {
                        return Err(field_err(
                            path,
                            "rope_scaling.rope_type",
                            format!("`{other}` is not supported (default, llama3)"),
                        ))
                    }
                }
            }
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads) && self.head_dim.is_none()
        {
            return Err(field_err(path, "num_attention_heads", "must divide hidden_size"));
        }
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(field_err(path, "num_key_value_heads", "must divide num_attention_heads"));
        }
        let qwen2 = model_type == "qwen2";
        let attention_bias = self.attention_bias.unwrap_or(false);
        Ok(LlamaConfig {
            model_type: model_type.into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: kv,
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
        })
    }
}

impl Gpt2File {
    fn resolve(self, path: &Path) -> Result<Gpt2Config, ModelError> {
        match self.activation_function.as_deref() {
            None | Some("gelu_new") | Some("gelu_pytorch_tanh") => {}
            Some(other) => {
                return Err(field_err(
                    path,
                    "activation_function",
                    format!("`{other}` is not supported (gelu_new)"),
                ))
            }
        }
        if self.n_head == 0 || !self.n_embd.is_multiple_of(self.n_head) {
            return Err(field_err(path, "n_head", "must divide n_embd"));
        }
        Ok(Gpt2Config {
            vocab_size: self.vocab_size,
            n_positions: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_inner: self.n_inner.unwrap_or(4 * self.n_embd),
            layer_norm_epsilon: self.layer_norm_epsilon,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 32, ROPE}"#;

    fn llama(rope: &str) -> Result<ModelConfig, ModelError> {
        ModelConfig::parse(&LLAMA.replace("ROPE", rope), Path::new("config.json"))
    }

    #[test]
    fn rope_theta_is_read_from_either_place() {
        let nested = llama(r#""rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}"#).unwrap();
        let flat = llama(r#""rope_theta": 500000.0"#).unwrap();
        for c in [nested, flat] {
            let ModelConfig::Llama(c) = c else { panic!() };
            assert_eq!(c.rope_theta, 500000.0);
            assert_eq!(c.rope_scaling, None);
            assert_eq!((c.head_dim, c.num_key_value_heads), (4, 1));
        }
    }

    #[test]
    fn missing_rope_theta_is_an_error_not_a_default() {
        let err = llama(r#""bos_token_id": 1"#).unwrap_err().to_string();
        assert!(err.contains("rope_theta") && err.contains("missing"), "{err}");
    }

    #[test]
    fn llama3_scaling_nested_and_flat() {
        let nested = llama(
            r#""rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        let flat = llama(
            r#""rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert_eq!(nested, flat);
        let ModelConfig::Llama(c) = nested else { panic!() };
        assert_eq!(c.rope_scaling.unwrap().original_max_position_embeddings, 8192);
    }

    #[test]
    fn model_type_falls_back_to_architectures() {
        let text = LLAMA
            .replace(r#""model_type": "llama","#, r#""architectures": ["LlamaForCausalLM"],"#)
            .replace("ROPE", r#""rope_theta": 1e4"#);
        assert!(matches!(ModelConfig::parse(&text, Path::new("c.json")), Ok(ModelConfig::Llama(_))));
        let err = ModelConfig::parse(r#"{"architectures": ["BertModel"]}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_type") && err.contains("supported"), "{err}");
    }

    #[test]
    fn unsupported_types_are_named() {
        let err =
            ModelConfig::parse(r#"{"model_type": "bert"}"#, Path::new("c.json")).unwrap_err().to_string();
        assert!(err.contains("`bert`") && err.contains("qwen2"), "{err}");
        let err = llama(r#""rope_theta": 1e4, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("yarn"), "{err}");
    }
}
