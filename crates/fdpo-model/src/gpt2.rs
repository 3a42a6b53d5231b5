//! GPT-2: learned positions, pre-LayerNorm blocks, GELU (tanh
//! approximation), Conv1D weights stored (in, out), lm_head tied to the
//! token embedding. Keys as in transformers' GPT2LMHeadModel
//! (`transformer.h.{i}.attn.c_attn.weight`, ...) or without the
//! `transformer.` prefix (the original checkpoints).

use candle_core::{Module, Tensor};
use candle_nn::Embedding;

use crate::attention::{attention, attention_packed};
use crate::config::Gpt2Config;
use crate::fused::fused;
use crate::layers::{check_positions, KvCache, LayerNorm, Positions, View};
use crate::linear::{Linear, WeightLayout};
use crate::{ModelError, Weights};

/// GPT-2's Conv1D: y = x W + b with W stored (in, out).
fn conv1d(w: &mut Weights, name: &str, inp: usize, out: usize) -> Result<Linear, ModelError> {
    let weight = w.get(&format!("{name}.weight"), &[inp, out])?;
    let bias = w.get(&format!("{name}.bias"), &[out])?;
    Ok(Linear::new(weight, Some(bias), WeightLayout::InOut))
}

#[derive(Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
}

/// A GPT-2 causal language model.
#[derive(Debug)]
pub struct Model {
    wte: Tensor,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    config: Gpt2Config,
}

impl Model {
    /// Builds the model from checkpoint weights.
    pub fn new(c: &Gpt2Config, w: &mut Weights) -> Result<Self, ModelError> {
        let p = if w.contains("wte.weight") && !w.contains("transformer.wte.weight") {
            ""
        } else {
            "transformer."
        };
        let (e, eps) = (c.n_embd, c.layer_norm_epsilon);
        let wte = w.get(&format!("{p}wte.weight"), &[c.vocab_size, e])?;
        let wpe = w.get(&format!("{p}wpe.weight"), &[c.n_positions, e])?;
        let blocks = (0..c.n_layer)
            .map(|i| {
                let b = format!("{p}h.{i}");
                Ok(Block {
                    ln_1: LayerNorm::new(w, &format!("{b}.ln_1"), e, eps)?,
                    c_attn: conv1d(w, &format!("{b}.attn.c_attn"), e, 3 * e)?,
                    attn_proj: conv1d(w, &format!("{b}.attn.c_proj"), e, e)?,
                    ln_2: LayerNorm::new(w, &format!("{b}.ln_2"), e, eps)?,
                    c_fc: conv1d(w, &format!("{b}.mlp.c_fc"), e, c.n_inner)?,
                    mlp_proj: conv1d(w, &format!("{b}.mlp.c_proj"), c.n_inner, e)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let ln_f = LayerNorm::new(w, &format!("{p}ln_f"), e, eps)?;
        Ok(Model { wte, wpe: Embedding::new(wpe, e), blocks, ln_f, config: c.clone() })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.config
    }

    /// Blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// ids (batch, seq) → logits (batch, seq, vocab); see `CausalLm::forward`.
    pub fn forward(
        &self,
        ids: &Tensor,
        padding: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let x = self.forward_hidden(ids, padding, cache)?;
        self.head(&x)
    }

    /// The LM head's weight (vocab, n_embd): wte.
    pub fn head_weight(&self) -> Option<&Tensor> {
        Some(&self.wte)
    }

    /// Final hidden states (…, n_embd) → logits (…, vocab) (the head tied to wte).
    pub fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::new(self.wte.clone(), None, WeightLayout::OutIn).forward(x)
    }

    /// ids (batch, seq) → final hidden states (batch, seq, n_embd), after ln_f.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        padding: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        check_positions(offset, t, self.config.n_positions, "n_positions")?;
        let view = View::padded(t, offset, padding, self.wte.dtype(), ids.device())?;
        self.hidden_states(ids, &view, cache)
    }

    /// ids (batch, seq) → final hidden states with the mask and positions
    /// of `view` (positions checked by the caller).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        view: &View,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (e, h) = (self.config.n_embd, self.config.n_head);
        let positions = match &view.positions {
            Positions::Range { offset } => {
                Tensor::arange(*offset as u32, (*offset + t) as u32, ids.device())?
            }
            Positions::PerRow(p) => p.clone(),
        };
        let mask = &view.mask;
        let mut x = candle_nn::Embedding::new(self.wte.clone(), e)
            .forward(ids)?
            .broadcast_add(&self.wpe.forward(&positions)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?;
            let y = match cache.as_deref_mut() {
                // Attended in place, token-major out.
                None if fused(&qkv) => attention_packed(&qkv, mask, h, h, None)?,
                cache => {
                    let split =
                        |k: usize| qkv.narrow(2, k * e, e)?.reshape((b, t, h, e / h))?.transpose(1, 2);
                    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
                    let (k, v) = match cache {
                        Some(c) => c.append(i, k, v)?,
                        None => (k, v),
                    };
                    attention(&q, &k, &v, mask)?.transpose(1, 2)?.reshape((b, t, e))?
                }
            };
            x = block.attn_proj.forward_residual(&y, &x)?;
            let m = crate::fused::gelu(&block.c_fc.forward(&block.ln_2.forward(&x)?)?)?;
            x = block.mlp_proj.forward_residual(&m, &x)?;
        }
        self.ln_f.forward(&x)
    }
}
