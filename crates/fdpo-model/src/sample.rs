//! Generation with the KV cache: greedy (temperature 0) or sampling with
//! temperature, top-k and top-p, seeded; K samples of one prompt run as one
//! batch (same positions, no padding) and stop at EOS or max_new_tokens.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{CausalLm, ModelError};

/// How to pick tokens (transformers' generation options, same names).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f64,
    /// Keep only the k most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens with this much probability (None: all).
    pub top_p: Option<f64>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { max_new_tokens: 64, temperature: 1.0, top_k: None, top_p: None, seed: 0 }
    }
}

/// Picks one token from `logits` (one row).
pub fn pick(logits: &[f32], cfg: &SamplingConfig, rng: &mut impl Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = cfg.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> =
        order.iter().map(|&i| ((logits[i] as f64 - max) / cfg.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = cfg.top_p {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (&i, p) in order.iter().zip(&probs) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    order[probs.len() - 1] as u32
}

/// `samples` continuations of `prompt`: the new tokens of each, up to and
/// excluding EOS.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    samples: usize,
    eos: Option<u32>,
    cfg: &SamplingConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>, ModelError> {
    if prompt.is_empty() || samples == 0 {
        return Ok(vec![Vec::new(); samples]);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut cache = model.new_cache();
    let ids: Vec<u32> = (0..samples).flat_map(|_| prompt.iter().copied()).collect();
    let mut input = Tensor::from_vec(ids, (samples, prompt.len()), device)?;
    let mut out = vec![Vec::new(); samples];
    let mut done = vec![false; samples];
    for _ in 0..cfg.max_new_tokens {
        let logits = model.forward(&input, None, Some(&mut cache))?;
        let t = logits.dim(1)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(samples);
        for (k, row) in last.iter().enumerate() {
            let token = pick(row, cfg, &mut rng);
            if !done[k] {
                if Some(token) == eos {
                    done[k] = true;
                } else {
                    out[k].push(token);
                }
            }
            next.push(token);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_vec(next, (samples, 1), device)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let cfg = SamplingConfig { temperature: 0.0, ..Default::default() };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(pick(&[0.1, 2.0, 2.0, -1.0], &cfg, &mut rng), 1);
    }

    /// Sampled frequencies follow softmax(logits/T) restricted by top-k/top-p.
    #[test]
    fn sampling_frequencies_follow_the_filtered_softmax() {
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 40_000;
        let count = |cfg: &SamplingConfig, rng: &mut ChaCha8Rng| {
            let mut c = [0usize; 4];
            for _ in 0..n {
                c[pick(&logits, cfg, rng) as usize] += 1;
            }
            c.map(|x| x as f64 / n as f64)
        };
        let full = count(&SamplingConfig { temperature: 1.0, ..Default::default() }, &mut rng);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (f, &l) in full.iter().zip(&logits) {
            assert!((f - (l as f64).exp() / z).abs() < 0.01, "{full:?}");
        }
        let top2 = count(&SamplingConfig { top_k: Some(2), ..Default::default() }, &mut rng);
        assert!(top2[2] == 0.0 && top2[3] == 0.0);
        assert!((top2[0] - 1f64.exp() / (1f64.exp() + 1.0)).abs() < 0.01);
        // top_p 0.5: the first token alone has 0.64 of the mass.
        let nucleus = count(&SamplingConfig { top_p: Some(0.5), ..Default::default() }, &mut rng);
        assert_eq!(nucleus[0], 1.0);
    }
}
