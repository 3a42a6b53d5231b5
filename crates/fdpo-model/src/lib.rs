//! fdpo-model: causal language models in candle, built only from ops that
//! carry a backward pass, so that every weight trains (candle-transformers'
//! fused softmax/RMSNorm/LayerNorm/RoPE have none and drop gradients
//! silently).
//!
//! - [`config`]: config.json as transformers writes it, resolved;
//! - [`weights`]: safetensors checkpoints (single or sharded) into trainable
//!   variables, with errors that name the tensor;
//! - [`layers`]: what the families share: RoPE, masks, attention, KV cache;
//! - [`llama`] (Llama 2/3, SmolLM, Mistral without sliding window, and
//!   Qwen2 through [`qwen2`]) and [`gpt2`]: one file per family;
//! - [`linear`]: linear layers, with a kernel for the few rows of decoding;
//! - [`CausalLm`]: the family chosen from config.json.
//!
//! - [`tokenizer`]: tokenizers and chat templates;
//! - [`packing`]: padding-free packed batches with shared prompts;
//! - [`logprobs`]: sequence log-probabilities of responses;
//! - [`sample`]: generation with the KV cache;
//! - [`save`]: writing the Hugging Face layout back;
//! - [`reward`]: the Bradley–Terry reward model (sequence-classification layout);
//! - [`bert`] and [`encoder`]: BERT sentence embeddings for the evaluation suite.

#![warn(missing_docs)]

pub mod attention;
pub mod bert;
pub mod config;
pub mod encoder;
pub mod fused;
pub mod gpt2;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod logprobs;
pub mod merge;
pub mod packing;
pub mod qwen2;
pub mod reward;
pub mod sample;
pub mod save;
pub mod tokenizer;
mod vmath;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub use config::ModelConfig;
pub use layers::KvCache;
use layers::{check_positions, Positions};
pub use tokenizer::{ChatMessage, TextTokenizer};
pub use weights::Weights;

/// Errors of model loading and running; messages name the file, tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A config.json field is missing or wrong.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A `model_type` fdpo cannot run.
    #[error("model_type `{model_type}` is not supported; supported: {supported}")]
    Unsupported {
        /// What the file says.
        model_type: String,
        /// The supported ones.
        supported: &'static str,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor {
        /// The checkpoint (directory or file).
        path: PathBuf,
        /// The safetensors key.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("{path}: tensor `{name}`: expected {expected:?}, found {found:?}")]
    Shape {
        /// The checkpoint.
        path: PathBuf,
        /// The safetensors key.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A safetensors file that cannot be read (truncated, corrupted).
    #[error("{path}: not a readable safetensors file: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What the reader said.
        message: String,
    },
    /// The directory holds only a pickle checkpoint.
    #[error("{path}: only pytorch_model.bin (pickle) found; fdpo never reads pickle. Convert it to safetensors, e.g. `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`")]
    Pickle {
        /// The directory.
        path: PathBuf,
    },
    /// tokenizer.json or tokenizer_config.json could not be used.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The chat template is missing or failed to render.
    #[error("{path}: chat template: {message}")]
    Template {
        /// The model directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A device or dtype that cannot be used.
    #[error("`{name}`: {message}")]
    Device {
        /// What was asked for.
        name: String,
        /// Why it cannot be used.
        message: String,
    },
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A JSON file (config.json, generation_config.json), errors naming it.
pub(crate) fn read_json(path: &std::path::Path) -> Result<serde_json::Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.into(),
        field: "(json)".into(),
        message: e.to_string(),
    })
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io { path: path.to_path_buf(), source }
    }
}

/// A causal language model of one of the supported families.
#[derive(Debug)]
pub enum CausalLm {
    /// Llama family (Llama, Mistral, Qwen2).
    Llama(llama::Model),
    /// GPT-2.
    Gpt2(gpt2::Model),
}

impl CausalLm {
    /// Loads config.json and the safetensors weights of a model directory,
    /// converting weights to `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(CausalLm, Weights), ModelError> {
        let config = ModelConfig::read(&dir.join("config.json"))?;
        let mut weights = Weights::load_dir(dir, dtype, device)?;
        config.check_layers(weights.names(), &dir.join("config.json"))?;
        let model = Self::build(&config, &mut weights)?;
        Ok((model, weights))
    }

    /// Builds the model for `config` from `weights`.
    pub fn build(config: &ModelConfig, weights: &mut Weights) -> Result<CausalLm, ModelError> {
        Ok(match config {
            ModelConfig::Llama(c) => CausalLm::Llama(llama::Model::new(c, weights)?),
            ModelConfig::Gpt2(c) => CausalLm::Gpt2(gpt2::Model::new(c, weights)?),
        })
    }

    /// The decoder of `config` without its language-model head (the
    /// backbone of a reward model; GPT-2's head is tied, so it is the same).
    pub fn build_backbone(config: &ModelConfig, weights: &mut Weights) -> Result<CausalLm, ModelError> {
        Ok(match config {
            ModelConfig::Llama(c) => CausalLm::Llama(llama::Model::backbone(c, weights)?),
            ModelConfig::Gpt2(c) => CausalLm::Gpt2(gpt2::Model::new(c, weights)?),
        })
    }

    /// Final hidden states (batch, seq, hidden) after the last norm; as
    /// [`CausalLm::forward`] otherwise.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        padding: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        Ok(match self {
            CausalLm::Llama(m) => m.forward_hidden(ids, padding, cache)?,
            CausalLm::Gpt2(m) => m.forward_hidden(ids, padding, cache)?,
        })
    }

    /// Final hidden states (rows, width, hidden) of a packed batch: each
    /// token attends within its own sequence at its own positions.
    pub fn forward_packed(&self, batch: &packing::PackedBatch) -> Result<Tensor, ModelError> {
        check_positions(0, batch.max_position, self.max_positions(), "the model's maximum positions")?;
        let view =
            layers::View { mask: batch.mask.clone(), positions: Positions::PerRow(batch.positions.clone()) };
        Ok(match self {
            CausalLm::Llama(m) => m.hidden_states(&batch.ids, &view, None)?,
            CausalLm::Gpt2(m) => m.hidden_states(&batch.ids, &view, None)?,
        })
    }

    /// Final hidden states (…, hidden) → logits (…, vocab): the LM head alone.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        Ok(match self {
            CausalLm::Llama(m) => m.head(hidden)?,
            CausalLm::Gpt2(m) => m.head(hidden)?,
        })
    }

    /// The LM head's weight (vocab, hidden), when the head is a plain
    /// product with it (None for a backbone).
    pub fn head_weight(&self) -> Option<&Tensor> {
        match self {
            CausalLm::Llama(m) => m.head_weight(),
            CausalLm::Gpt2(m) => m.head_weight(),
        }
    }

    /// The hidden size.
    pub fn hidden_size(&self) -> usize {
        match self {
            CausalLm::Llama(m) => m.config().hidden_size,
            CausalLm::Gpt2(m) => m.config().n_embd,
        }
    }

    /// The longest sequence (prompt + response) the model accepts.
    pub fn max_positions(&self) -> usize {
        match self {
            CausalLm::Llama(m) => m.config().max_position_embeddings,
            CausalLm::Gpt2(m) => m.config().n_positions,
        }
    }

    /// A fresh cache for incremental decoding.
    pub fn new_cache(&self) -> KvCache {
        match self {
            CausalLm::Llama(m) => KvCache::new(m.num_layers()),
            CausalLm::Gpt2(m) => KvCache::new(m.num_layers()),
        }
    }

    /// ids (batch, seq) u32 → logits (batch, seq, vocab). `padding` (batch,
    /// offset + seq), 1 for real tokens and 0 for padding, masks keys;
    /// `cache` holds the keys and values of earlier positions and is extended.
    pub fn forward(
        &self,
        ids: &Tensor,
        padding: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        Ok(match self {
            CausalLm::Llama(m) => m.forward(ids, padding, cache)?,
            CausalLm::Gpt2(m) => m.forward(ids, padding, cache)?,
        })
    }
}

/// The device named by `cpu`, `cuda` or `cuda:N` (CUDA needs the `cuda` feature).
pub fn device(name: &str) -> Result<Device, ModelError> {
    let bad = |message: String| ModelError::Device { name: name.to_string(), message };
    match name {
        "cpu" => Ok(Device::Cpu),
        _ if name == "cuda" || name.starts_with("cuda:") => {
            let ordinal = match name.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse().map_err(|_| bad("expected cuda:<index>".into()))?,
            };
            if cfg!(feature = "cuda") {
                Device::new_cuda(ordinal).map_err(|e| bad(e.to_string()))
            } else {
                Err(bad(
                    "this fdpo was built without CUDA; rebuild with `--features cuda` (needs nvcc)".into()
                ))
            }
        }
        _ => Err(bad("expected cpu, cuda or cuda:<index>".into())),
    }
}

/// The working dtype named by `f32`, `bf16` or `f16`.
pub fn dtype(name: &str) -> Result<DType, ModelError> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(ModelError::Device {
            name: name.into(),
            message: "expected a dtype: f32, bf16 or f16".into(),
        }),
    }
}
