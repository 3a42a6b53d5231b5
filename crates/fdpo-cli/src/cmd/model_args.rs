//! Options shared by the commands that load a model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use fdpo_model::{CausalLm, TextTokenizer};

/// Where the model is and what it runs on.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A local Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Working dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// A loaded model with its tokenizer.
pub struct Loaded {
    /// The model.
    pub model: CausalLm,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Where it runs.
    pub device: Device,
}

impl ModelArgs {
    /// Loads the model and tokenizer.
    pub fn load(&self) -> Result<Loaded> {
        let device = fdpo_model::device(&self.device)?;
        let dtype = fdpo_model::dtype(&self.dtype)?;
        let (model, _) = CausalLm::load(&self.model, dtype, &device)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let tokenizer = TextTokenizer::load(&self.model)?;
        Ok(Loaded { model, tokenizer, device })
    }
}
