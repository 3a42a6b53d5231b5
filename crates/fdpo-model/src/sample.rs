//! Generation with the KV cache: greedy (temperature 0) or sampling with
//! temperature, top-k and top-p, seeded; K samples of each of a batch of
//! prompts run as one left-padded batch and stop at EOS or max_new_tokens.

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
    /// Keep only the k most likely tokens (None or Some(0): all, as
    /// transformers' `top_k=0`).
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
    // transformers: top_k = 0 means no top-k filtering.
    let top_k = cfg.top_k.filter(|&k| k > 0);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    if top_k.is_some() || cfg.top_p.is_some() {
        // The filters keep the most likely tokens: most likely first. Without
        // them the draw needs no order (a sort per row cost more than the rest).
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    }
    if let Some(k) = top_k {
        order.truncate(k);
    }
    let max = order.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> =
        order.iter().map(|&i| ((logits[i] as f64 - max) / cfg.temperature).exp()).collect();
    if let Some(top_p) = cfg.top_p {
        let total: f64 = probs.iter().sum();
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p / total;
                acc >= top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.random::<f64>() * total;
    // Rounding can leave u ≥ Σ p: then the last token with any probability.
    let mut last = order[0];
    for (&i, &p) in order.iter().zip(&probs) {
        if u < p {
            return i as u32;
        }
        if p > 0.0 {
            last = i;
        }
        u -= p;
    }
    last as u32
}

/// `samples` continuations of `prompt`: the new tokens of each, up to and
/// excluding the first EOS.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    samples: usize,
    eos: &[u32],
    cfg: &SamplingConfig,
    device: &Device,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let mut out = generate_batch(model, &[prompt.to_vec()], 0, samples, eos, cfg, device)?;
    Ok(out.pop().unwrap_or_default())
}

/// `samples` continuations of each prompt, all prompts in one left-padded
/// batch. `prompts[i]` is prompt number `first_prompt + i` of the caller's
/// list; its k-th sample draws from its own generator seeded from
/// (`cfg.seed`, that number, k), so results do not depend on how prompts
/// are batched.
pub fn generate_batch(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    first_prompt: usize,
    samples: usize,
    eos: &[u32],
    cfg: &SamplingConfig,
    device: &Device,
) -> Result<Vec<Vec<Vec<u32>>>, ModelError> {
    let rows = prompts.len() * samples;
    let mut out = vec![vec![Vec::new(); samples]; prompts.len()];
    if rows == 0 || prompts.iter().any(|p| p.is_empty()) {
        return Ok(out);
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut mask) = (Vec::with_capacity(rows * width), Vec::with_capacity(rows * width));
    let mut rngs = Vec::with_capacity(rows);
    for (i, p) in prompts.iter().enumerate() {
        for k in 0..samples {
            ids.extend(std::iter::repeat_n(0, width - p.len()).chain(p.iter().copied()));
            mask.extend((0..width).map(|j| u8::from(j >= width - p.len())));
            let n = (first_prompt + i) as u64;
            let seed = cfg.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64).rotate_left(32);
            rngs.push(ChaCha8Rng::seed_from_u64(seed));
        }
    }
    let mut input = Tensor::from_vec(ids, (rows, width), device)?;
    let mut padding = Tensor::from_vec(mask, (rows, width), device)?;
    let mut cache = model.new_cache();
    let mut done = vec![false; rows];
    for _ in 0..cfg.max_new_tokens {
        let logits = model.forward(&input, Some(&padding), Some(&mut cache))?;
        let t = logits.dim(1)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(rows);
        for (r, row) in last.iter().enumerate() {
            let token = pick(row, cfg, &mut rngs[r]);
            if !done[r] {
                if eos.contains(&token) {
                    done[r] = true;
                } else {
                    out[r / samples][r % samples].push(token);
                }
            }
            next.push(token);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_vec(next, (rows, 1), device)?;
        padding = Tensor::cat(&[&padding, &Tensor::ones((rows, 1), DType::U8, device)?], 1)?;
    }
    Ok(out)
}

/// End-of-sequence ids of a model directory: generation_config.json's
/// `eos_token_id` (a number or a list) and the tokenizer's EOS.
pub fn eos_ids(dir: &std::path::Path, tokenizer_eos: Option<u32>) -> Result<Vec<u32>, ModelError> {
    let mut ids: Vec<u32> = tokenizer_eos.into_iter().collect();
    let path = dir.join("generation_config.json");
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.clone(),
            field: "(json)".into(),
            message: e.to_string(),
        })?;
        match value.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
            Some(serde_json::Value::Array(list)) => {
                ids.extend(list.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
            }
            _ => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
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
        // transformers' top_k = 0 is no filtering (not greedy): the same
        // draws as no top-k at all from the same stream.
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(2), ChaCha8Rng::seed_from_u64(2));
        let zero = SamplingConfig { top_k: Some(0), ..Default::default() };
        let draws: Vec<u32> = (0..200).map(|_| pick(&logits, &zero, &mut a)).collect();
        assert!(draws.iter().any(|&t| t != 0), "top_k 0 must not be greedy");
        assert!(draws.iter().all(|&t| t == pick(&logits, &SamplingConfig::default(), &mut b)));
        // top_p 0.5: the first token alone has 0.64 of the mass.
        let nucleus = count(&SamplingConfig { top_p: Some(0.5), ..Default::default() }, &mut rng);
        assert_eq!(nucleus[0], 1.0);
    }
}
