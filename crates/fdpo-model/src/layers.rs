//! What the model families share: rotary position tables (with Llama 3
//! frequency scaling), LayerNorm, attention masks, scaled-dot-product attention with
//! grouped-query heads, and the explicit key/value cache. Every op here has
//! a backward pass in candle.

use candle_core::{DType, Device, Tensor, D};

use crate::config::Llama3RopeScaling;
use crate::{ModelError, Weights};

/// LayerNorm with learned scale and shift (GPT-2, BERT), from differentiable ops.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// `{name}.weight` and `{name}.bias`, both (size,).
    pub fn new(w: &mut Weights, name: &str, size: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(LayerNorm {
            weight: w.get(&format!("{name}.weight"), &[size])?,
            bias: w.get(&format!("{name}.bias"), &[size])?,
            eps: eps as f32,
        })
    }

    /// x (…, size) normalised over the last dimension, then scaled and shifted.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        crate::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Keys and values of earlier positions, per layer: a buffer (batch,
/// kv_heads, capacity, head_dim) per tensor, of which the first `len`
/// positions are filled. Appending writes in place and doubles the capacity
/// when it runs out, so decoding does not copy the whole cache every token;
/// the keys and values handed to attention are views of the buffer.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<CachedLayer>>,
}

#[derive(Debug)]
struct CachedLayer {
    keys: Tensor,
    values: Tensor,
    len: usize,
}

impl Clone for KvCache {
    /// A deep copy: the clone's appends never write into this cache's buffers.
    fn clone(&self) -> Self {
        let copy = |l: &CachedLayer| -> CachedLayer {
            let deep = |t: &Tensor| t.copy().expect("copying a cache buffer");
            CachedLayer { keys: deep(&l.keys), values: deep(&l.values), len: l.len }
        };
        KvCache { layers: self.layers.iter().map(|l| l.as_ref().map(copy)).collect() }
    }
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache { layers: (0..layers).map(|_| None).collect() }
    }

    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.len).unwrap_or(0)
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `k`, `v` (batch, kv_heads, seq, head_dim) to layer `layer`
    /// and returns the full keys and values. The cache keeps values, not
    /// the autograd graph that made them (stored with their graphs, the
    /// keys and values of every step kept every intermediate tensor of every
    /// earlier step alive: 1 GB to sample 8 × 64 tokens from a 6.8M model,
    /// 153 MB without).
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let entry = &mut self.layers[layer];
        let len = entry.as_ref().map_or(0, |l| l.len);
        let capacity = entry.as_ref().map_or(0, |l| l.keys.dim(2).unwrap_or(0));
        if len + t > capacity {
            let capacity = (len + t).next_power_of_two().max(2 * capacity);
            let grow = |old: Option<&Tensor>, new: &Tensor| -> candle_core::Result<Tensor> {
                let (b, h, _, d) = new.dims4()?;
                let buffer = Tensor::zeros((b, h, capacity, d), new.dtype(), new.device())?;
                if let Some(old) = old {
                    buffer.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            let keys = grow(entry.as_ref().map(|l| &l.keys), &k)?;
            let values = grow(entry.as_ref().map(|l| &l.values), &v)?;
            *entry = Some(CachedLayer { keys, values, len });
        }
        let l = entry.as_mut().expect("allocated above");
        l.keys.slice_set(&k.detach().contiguous()?, 2, len)?;
        l.values.slice_set(&v.detach().contiguous()?, 2, len)?;
        l.len = len + t;
        if len == 0 {
            // A first pass attends to its own keys and values: keep their graphs.
            return Ok((k, v));
        }
        Ok((l.keys.narrow(2, 0, l.len)?, l.values.narrow(2, 0, l.len)?))
    }
}

/// cos and sin tables (max_positions, head_dim/2) of rotary embeddings.
#[derive(Debug, Clone)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    /// cos then sin per position (max_positions, head_dim), for the fused kernel.
    table: Tensor,
}

impl Rotary {
    /// Tables for θ = `theta`, optionally with Llama 3 scaling (as in
    /// transformers' `_compute_llama3_parameters`).
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: Option<Llama3RopeScaling>,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                match scaling {
                    None => f,
                    Some(s) => {
                        let old = s.original_max_position_embeddings as f64;
                        let low_wavelen = old / s.low_freq_factor;
                        let high_wavelen = old / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                }
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                // f32 product as transformers computes it (inv_freq and
                // positions in f32), then cos/sin.
                let angle = (p as f32 * *f as f32) as f64;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (max_positions, half);
        Ok(Rotary {
            cos: Tensor::from_vec(cos.clone(), shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin.clone(), shape, device)?.to_dtype(dtype)?,
            table: {
                let (c, s) = (Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?);
                Tensor::cat(&[&c, &s], 1)?.to_dtype(dtype)?
            },
        })
    }

    /// cos then sin per position (max_positions, head_dim), as
    /// [`crate::attention::rope`] reads them.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// Applies the rotation to token-major x (batch, seq, n·head_dim): the
    /// first `rotate` heads of each token, the others copied (a packed q/k/v
    /// projection is rotated in one pass). f32 on the CPU.
    pub fn apply_tokens(
        &self,
        x: &Tensor,
        positions: &Positions,
        rotate: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let head_dim = self.table.dim(1)?;
        crate::attention::rope(x, &self.table, &positions.ids(b, t, x.device())?, head_dim, rotate)
    }

    /// Applies the rotation to x (batch, heads, seq, head_dim) (the "rotate
    /// half" layout of Llama and Qwen2) at the given positions, with
    /// candle's ops (any dtype or device).
    pub fn apply(&self, x: &Tensor, positions: &Positions) -> candle_core::Result<Tensor> {
        match positions {
            Positions::Range { offset } => {
                let seq = x.dim(2)?;
                let cos = self.cos.narrow(0, *offset, seq)?;
                let sin = self.sin.narrow(0, *offset, seq)?;
                candle_nn::rotary_emb::rope_slow(&x.contiguous()?, &cos, &sin)
            }
            Positions::PerRow(ids) => {
                // cos/sin rows gathered per (batch, position): (b, 1, t, head_dim).
                let (b, t) = ids.dims2()?;
                let gather = |table: &Tensor| -> candle_core::Result<Tensor> {
                    let half = table.index_select(&ids.flatten_all()?, 0)?.reshape((b, 1, t, ()))?;
                    Tensor::cat(&[&half, &half], D::Minus1)
                };
                let (cos, sin) = (gather(&self.cos)?, gather(&self.sin)?);
                let x = x.contiguous()?;
                let d = x.dim(D::Minus1)?;
                let rotated = Tensor::cat(
                    &[&x.narrow(D::Minus1, d / 2, d - d / 2)?.neg()?, &x.narrow(D::Minus1, 0, d / 2)?],
                    D::Minus1,
                )?;
                x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
            }
        }
    }
}

/// What each token of a forward pass sees and where it stands: the
/// additive mask (batch or 1, 1, seq, keys) and the positions.
#[derive(Debug, Clone)]
pub struct View {
    /// Additive attention mask.
    pub mask: Tensor,
    /// Positions of the new tokens.
    pub positions: Positions,
}

impl View {
    /// `seq` new tokens after `offset` cached ones, causal, with an
    /// optional padding mask (batch, offset + seq): see [`attention_mask`]
    /// and [`Positions::new`].
    pub fn padded(
        seq: usize,
        offset: usize,
        padding: Option<&Tensor>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<View> {
        Ok(View {
            mask: attention_mask(seq, offset, padding, dtype, device)?,
            positions: Positions::new(seq, offset, padding)?,
        })
    }
}

/// Fails when `offset + seq` positions exceed the model's `max` (`what`
/// names the config field in the message).
pub fn check_positions(offset: usize, seq: usize, max: usize, what: &str) -> candle_core::Result<()> {
    if offset + seq > max {
        candle_core::bail!("sequence of {} positions exceeds {what} {max}", offset + seq);
    }
    Ok(())
}

/// Positions of the tokens of a forward pass.
#[derive(Debug, Clone)]
pub enum Positions {
    /// Every row at offset..offset+seq (no padding before real tokens).
    Range {
        /// Positions already in the cache.
        offset: usize,
    },
    /// Per row (batch, seq) u32: the count of real tokens before each one,
    /// as transformers derives them from the attention mask (left padding).
    PerRow(Tensor),
}

impl Positions {
    /// The positions as a (batch, seq) u32 tensor.
    pub fn ids(&self, batch: usize, seq: usize, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Positions::Range { offset } => Tensor::arange(*offset as u32, (offset + seq) as u32, device)?
                .unsqueeze(0)?
                .repeat((batch, 1)),
            Positions::PerRow(ids) => Ok(ids.clone()),
        }
    }

    /// Positions for `seq` new tokens after `offset` cached ones; with a
    /// padding mask (batch, offset + seq), per row from its cumulative sum.
    pub fn new(seq: usize, offset: usize, padding: Option<&Tensor>) -> candle_core::Result<Positions> {
        match padding {
            None => Ok(Positions::Range { offset }),
            Some(pad) => {
                let counts = pad.to_dtype(DType::F32)?.cumsum(1)?;
                let pos = (counts - 1.0)?.clamp(0f32, f32::MAX)?;
                Ok(Positions::PerRow(pos.narrow(1, offset, seq)?.to_dtype(DType::U32)?))
            }
        }
    }
}

/// Additive mask (batch or 1, 1, seq, offset + seq): 0 where query i may see
/// key j (j ≤ offset + i and key j is not padding), a large negative number
/// elsewhere. `padding` (batch, offset + seq) holds 1 for tokens, 0 for padding.
pub fn attention_mask(
    seq: usize,
    offset: usize,
    padding: Option<&Tensor>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = offset + seq;
    let causal: Vec<u8> = (0..seq).flat_map(|i| (0..total).map(move |j| u8::from(j <= offset + i))).collect();
    let mut allowed = Tensor::from_vec(causal, (1, 1, seq, total), device)?;
    if let Some(pad) = padding {
        let pad = pad.to_dtype(DType::U8)?.unsqueeze(1)?.unsqueeze(1)?; // (b, 1, 1, total)
        allowed = allowed.broadcast_mul(&pad)?;
    }
    let zeros = Tensor::zeros(allowed.shape(), dtype, device)?;
    let neg = Tensor::full(f32::MIN / 2.0, allowed.shape(), device)?.to_dtype(dtype)?;
    allowed.where_cond(&zeros, &neg)
}

/// Repeats each key/value head `n_rep` times: (b, kv, s, d) → (b, kv·n_rep, s, d).
pub fn repeat_kv(x: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, kv, n_rep, s, d))?.reshape((b, kv * n_rep, s, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_with_offset_and_padding() {
        let dev = Device::Cpu;
        let pad = Tensor::new(&[[0u8, 1, 1], [1, 1, 1]], &dev).unwrap();
        let full = attention_mask(2, 1, Some(&pad), DType::F32, &dev).unwrap().squeeze(1).unwrap();
        let rows = full.to_vec3::<f32>().unwrap();
        // Row 0 (padding at key 0): query 0 (position 1) sees key 1 only.
        assert_eq!(rows[0][0].iter().map(|&x| x == 0.0).collect::<Vec<_>>(), [false, true, false]);
        assert_eq!(rows[0][1].iter().map(|&x| x == 0.0).collect::<Vec<_>>(), [false, true, true]);
        assert_eq!(rows[1][0].iter().map(|&x| x == 0.0).collect::<Vec<_>>(), [true, true, false]);
    }

    /// Appending piece by piece (through two capacity doublings) gives the
    /// concatenation; a clone is independent of the original.
    #[test]
    fn cache_appends_equal_concatenation_and_clones_are_deep() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 11.0 * 4.0, &dev).unwrap().reshape((2, 3, 11, 4)).unwrap();
        let mut cache = KvCache::new(1);
        let mut got = None;
        let mut copy = None;
        for (start, len) in [(0, 3), (3, 1), (4, 1), (5, 4), (9, 2)] {
            let piece = x.narrow(2, start, len).unwrap();
            got = Some(cache.append(0, piece.clone(), (&piece * 2.0).unwrap()).unwrap());
            if start == 4 {
                copy = Some(cache.clone());
            }
        }
        let (k, v) = got.unwrap();
        assert_eq!(cache.len(), 11);
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let v2 = (&x * 2.0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v2);
        let mut copy = copy.unwrap();
        assert_eq!(copy.len(), 5);
        let other = Tensor::ones((2, 3, 1, 4), DType::F32, &dev).unwrap();
        let (k5, _) = copy.append(0, other.clone(), other).unwrap();
        assert_eq!(k5.narrow(2, 5, 1).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 24.0);
        // The original still holds x at position 5.
        let (k6, _) = cache.append(0, x.narrow(2, 0, 1).unwrap(), x.narrow(2, 0, 1).unwrap()).unwrap();
        let expect = x.narrow(2, 5, 1).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(k6.narrow(2, 5, 1).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), expect);
    }

    #[test]
    fn repeat_kv_repeats_each_head_in_place() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 4.0, &dev).unwrap().reshape((1, 2, 2, 1)).unwrap();
        let r = repeat_kv(x, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(r, [0.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0]);
    }
}
