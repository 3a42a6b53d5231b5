//! The Llama-family decoder (Llama 2/3, SmolLM, Mistral without sliding
//! window; Qwen2 through `qwen2.rs`): RMSNorm, rotary positions (with Llama
//! 3 scaling), grouped-query attention, SwiGLU MLP, tied or untied
//! embeddings. Weights use the checkpoint's names
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...).
//!
//! Order: the resolved config is `crate::config::LlamaConfig`; then the
//! blocks, `Model`, `forward`.

use candle_core::{Module, Tensor};
use candle_nn::Embedding;

use crate::attention::{attention, attention_packed};
use crate::config::LlamaConfig;
use crate::fused::fused;
use crate::layers::{check_positions, KvCache, Positions, Rotary, View};
use crate::linear::{Linear, WeightLayout};
use crate::{ModelError, Weights};

fn linear(w: &mut Weights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear, ModelError> {
    let weight = w.get(&format!("{name}.weight"), &[out, inp])?;
    let bias = if bias { Some(w.get(&format!("{name}.bias"), &[out])?) } else { None };
    Ok(Linear::new(weight, bias, WeightLayout::OutIn))
}

/// RMSNorm with a learned scale (fused kernel with its own backward).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(w: &mut Weights, name: &str, size: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(RmsNorm { weight: w.get(&format!("{name}.weight"), &[size])?, eps: eps as f32 })
    }

    /// x (…, size) → x / rms(x) · weight.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::fused::rms_norm(x, &self.weight, self.eps)
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(c: &LlamaConfig, w: &mut Weights, p: &str) -> Result<Self, ModelError> {
        let (h, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        Ok(Attention {
            q_proj: linear(w, &format!("{p}.q_proj"), h * d, c.hidden_size, c.qkv_bias)?,
            k_proj: linear(w, &format!("{p}.k_proj"), kv * d, c.hidden_size, c.qkv_bias)?,
            v_proj: linear(w, &format!("{p}.v_proj"), kv * d, c.hidden_size, c.qkv_bias)?,
            o_proj: linear(w, &format!("{p}.o_proj"), c.hidden_size, h * d, c.o_bias)?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    /// `residual` + attention over x.
    fn forward(
        &self,
        x: &Tensor,
        residual: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        positions: &Positions,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        if !fused(x) {
            let y = self.forward_unfused(x, rotary, mask, positions, cache)?;
            return self.o_proj.forward_residual(&y, residual);
        }
        let (b, t, _) = x.dims3()?;
        let (h, kv, d) = (self.heads, self.kv_heads, self.head_dim);
        let Some((cache, layer)) = cache else {
            // One projection for q, k and v, rotated and attended in place.
            let qkv = Linear::stack(&[&self.q_proj, &self.k_proj, &self.v_proj])?.forward(x)?;
            let rope = (rotary.table(), &positions.ids(b, t, x.device())?);
            return self.o_proj.forward_residual(&attention_packed(&qkv, mask, h, kv, Some(rope))?, residual);
        };
        // Decoding: separate projections (stacking the weights would copy
        // them for every token), head-major for the cache.
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, d))?.transpose(1, 2);
        let q = heads(rotary.apply_tokens(&self.q_proj.forward(x)?, positions, h)?, h)?;
        let k = heads(rotary.apply_tokens(&self.k_proj.forward(x)?, positions, kv)?, kv)?;
        let v = heads(self.v_proj.forward(x)?, kv)?;
        let (k, v) = cache.append(layer, k, v)?;
        let y = attention(&q, &k, &v, mask)?;
        self.o_proj.forward_residual(&y.transpose(1, 2)?.reshape((b, t, h * d))?, residual)
    }

    /// Attention before the output projection, with candle's ops, for
    /// dtypes and devices without fused kernels.
    fn forward_unfused(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        positions: &Positions,
        cache: Option<(&mut KvCache, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2);
        let q = rotary.apply(&split(self.q_proj.forward(x)?, self.heads)?, positions)?;
        let k = rotary.apply(&split(self.k_proj.forward(x)?, self.kv_heads)?, positions)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v)?,
            None => (k, v),
        };
        let y = attention(&q, &k, &v, mask)?;
        y.transpose(1, 2)?.reshape((b, t, self.heads * self.head_dim))
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(c: &LlamaConfig, w: &mut Weights, p: &str) -> Result<Self, ModelError> {
        let (h, i, b) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(Mlp {
            gate_proj: linear(w, &format!("{p}.gate_proj"), i, h, b)?,
            up_proj: linear(w, &format!("{p}.up_proj"), i, h, b)?,
            down_proj: linear(w, &format!("{p}.down_proj"), h, i, b)?,
        })
    }

    /// `residual` + the MLP of x.
    fn forward(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        self.down_proj.forward_residual(&crate::fused::silu_mul(&gate, &self.up_proj.forward(x)?)?, residual)
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family causal language model.
#[derive(Debug)]
pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// None for a backbone (e.g. under a reward model's scalar head).
    lm_head: Option<Linear>,
    rotary: Rotary,
    config: LlamaConfig,
}

impl Model {
    /// Builds the model from checkpoint weights (keys as transformers saves them).
    pub fn new(c: &LlamaConfig, w: &mut Weights) -> Result<Self, ModelError> {
        Self::build(c, w, true)
    }

    /// The decoder without its language-model head.
    pub fn backbone(c: &LlamaConfig, w: &mut Weights) -> Result<Self, ModelError> {
        Self::build(c, w, false)
    }

    fn build(c: &LlamaConfig, w: &mut Weights, head: bool) -> Result<Self, ModelError> {
        let embed = w.get("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Block {
                    input_layernorm: RmsNorm::new(
                        w,
                        &format!("{p}.input_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    self_attn: Attention::new(c, w, &format!("{p}.self_attn"))?,
                    post_attention_layernorm: RmsNorm::new(
                        w,
                        &format!("{p}.post_attention_layernorm"),
                        c.hidden_size,
                        c.rms_norm_eps,
                    )?,
                    mlp: Mlp::new(c, w, &format!("{p}.mlp"))?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let norm = RmsNorm::new(w, "model.norm", c.hidden_size, c.rms_norm_eps)?;
        // Tied: lm_head is embed_tokens (some tied checkpoints still store a copy).
        let lm_head = if !head {
            None
        } else if c.tie_word_embeddings {
            Some(Linear::new(embed.clone(), None, WeightLayout::OutIn))
        } else {
            Some(linear(w, "lm_head", c.vocab_size, c.hidden_size, false)?)
        };
        let rotary = Rotary::new(
            c.head_dim,
            c.rope_theta,
            c.rope_scaling,
            c.max_position_embeddings,
            embed.dtype(),
            embed.device(),
        )?;
        Ok(Model {
            embed_tokens: Embedding::new(embed, c.hidden_size),
            layers,
            norm,
            lm_head,
            rotary,
            config: c.clone(),
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
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

    /// The LM head's weight (vocab, hidden), when it has no bias.
    pub fn head_weight(&self) -> Option<&Tensor> {
        self.lm_head.as_ref().and_then(Linear::out_in_weight)
    }

    /// Final hidden states (…, hidden) → logits (…, vocab).
    pub fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let head = self
            .lm_head
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("a backbone has no lm_head".into()))?;
        head.forward(&x.contiguous()?)?.contiguous()
    }

    /// ids (batch, seq) → final hidden states (batch, seq, hidden), after the last norm.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        padding: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        check_positions(offset, t, self.config.max_position_embeddings, "max_position_embeddings")?;
        let view = View::padded(t, offset, padding, self.embed_tokens.embeddings().dtype(), ids.device())?;
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
        let (mask, positions) = (&view.mask, &view.positions);
        let mut x = self.embed_tokens.forward(ids)?;
        for (i, block) in self.layers.iter().enumerate() {
            let h = block.input_layernorm.forward(&x)?;
            x = block.self_attn.forward(
                &h,
                &x,
                &self.rotary,
                mask,
                positions,
                cache.as_deref_mut().map(|c| (c, i)),
            )?;
            x = block.mlp.forward(&block.post_attention_layernorm.forward(&x)?, &x)?;
        }
        self.norm.forward(&x)
    }
}
