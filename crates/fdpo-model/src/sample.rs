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
    generate_ensemble(&[(model, 1.0)], prompts, first_prompt, samples, eos, cfg, device)
}

/// log Σᵢ wᵢ softmax(rowᵢ / T) (weights normalised): the arithmetic mixture
/// of the models' tempered next-token distributions, as logits at
/// temperature 1. With one model, the row divided by T (shifted).
pub fn mixture_logits(rows: &[&[f32]], weights: &[f64], temperature: f64) -> Vec<f32> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let total: f64 = weights.iter().sum();
    let mut mix = vec![0f64; rows[0].len()];
    for (row, w) in rows.iter().zip(weights) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
        let exp: Vec<f64> = row.iter().map(|&x| ((x as f64 - max) / t).exp()).collect();
        let z: f64 = exp.iter().sum();
        for (m, e) in mix.iter_mut().zip(exp) {
            *m += w / total * e / z;
        }
    }
    mix.iter().map(|&p| p.ln() as f32).collect()
}

/// As [`generate_batch`], each token drawn from the arithmetic mixture
/// Σ wᵢ πᵢ(· | prefix) of `models` (an ensemble at decode time; each model
/// keeps its own KV cache). Temperature applies to each model before the
/// mixing, top-k and top-p to the mixture.
pub fn generate_ensemble(
    models: &[(&CausalLm, f64)],
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
    let mut caches: Vec<_> = models.iter().map(|(m, _)| m.new_cache()).collect();
    let weights: Vec<f64> = models.iter().map(|(_, w)| *w).collect();
    let mut done = vec![false; rows];
    for _ in 0..cfg.max_new_tokens {
        let mut lasts = Vec::with_capacity(models.len());
        for ((model, _), cache) in models.iter().zip(caches.iter_mut()) {
            let logits = model.forward(&input, Some(&padding), Some(cache))?;
            let t = logits.dim(1)?;
            lasts.push(logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        }
        if lasts.iter().any(|l| l[0].len() != lasts[0][0].len()) {
            return Err(ModelError::Candle(candle_core::Error::Msg(
                "the ensemble's models have vocabularies of different sizes".into(),
            )));
        }
        let mut next = Vec::with_capacity(rows);
        for r in 0..rows {
            let token = if models.len() == 1 {
                pick(&lasts[0][r], cfg, &mut rngs[r])
            } else {
                let row: Vec<&[f32]> = lasts.iter().map(|l| l[r].as_slice()).collect();
                let mixed = mixture_logits(&row, &weights, cfg.temperature);
                // The mixture's logits are already tempered: greedy stays greedy.
                let at_one = SamplingConfig {
                    temperature: if cfg.temperature > 0.0 { 1.0 } else { 0.0 },
                    ..cfg.clone()
                };
                pick(&mixed, &at_one, &mut rngs[r])
            };
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
        let value = crate::read_json(&path)?;
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

    /// Tokens drawn by the ensemble sampler follow the arithmetic mixture
    /// 0.3·π_llama + 0.7·π_qwen2 of the two fixture models' next-token
    /// distributions (computed here from each model's own forward pass):
    /// Pearson's χ² over the 96 tokens (cells with expected count < 5
    /// pooled) stays below the 0.999 quantile of its distribution. A fixed
    /// seed makes the draw, hence the test, deterministic.
    #[test]
    fn ensemble_samples_follow_the_arithmetic_mixture() {
        let dir = |f: &str| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(f);
        let device = Device::Cpu;
        let (a, _) = CausalLm::load(&dir("llama"), DType::F32, &device).unwrap();
        let (b, _) = CausalLm::load(&dir("qwen2"), DType::F32, &device).unwrap();
        let prompt = vec![1u32, 5, 9, 20];
        let probs = |m: &CausalLm| -> Vec<f64> {
            let ids = Tensor::new(prompt.as_slice(), &device).unwrap().unsqueeze(0).unwrap();
            let logits = m.forward(&ids, None, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            let last = logits.last().unwrap();
            let max = last.iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y)) as f64;
            let e: Vec<f64> = last.iter().map(|&x| (x as f64 - max).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|x| x / z).collect()
        };
        let (pa, pb) = (probs(&a), probs(&b));
        let mix: Vec<f64> = pa.iter().zip(&pb).map(|(x, y)| 0.3 * x + 0.7 * y).collect();
        let n = 4000;
        let cfg = SamplingConfig { max_new_tokens: 1, seed: 11, ..Default::default() };
        let out = generate_ensemble(
            &[(&a, 0.3), (&b, 0.7)],
            std::slice::from_ref(&prompt),
            0,
            n,
            &[],
            &cfg,
            &device,
        )
        .unwrap();
        let mut counts = vec![0f64; mix.len()];
        for s in &out[0] {
            counts[s[0] as usize] += 1.0;
        }
        // Pool the cells with fewer than 5 expected draws.
        let (mut chi2, mut cells, mut pooled_o, mut pooled_e) = (0.0, 0usize, 0.0, 0.0);
        for (o, p) in counts.iter().zip(&mix) {
            let e = p * n as f64;
            if e < 5.0 {
                pooled_o += o;
                pooled_e += e;
            } else {
                chi2 += (o - e).powi(2) / e;
                cells += 1;
            }
        }
        if pooled_e > 0.0 {
            chi2 += (pooled_o - pooled_e).powi(2) / pooled_e;
            cells += 1;
        }
        let df = (cells - 1) as f64;
        // Wilson–Hilferty: the 0.999 quantile of χ²(df).
        let z = 3.090_232;
        let quantile = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
        assert!(chi2 < quantile, "χ² = {chi2} over {cells} cells, 0.999 quantile {quantile}");
        // Either model alone is rejected: the test can tell them apart.
        let alone: f64 = counts
            .iter()
            .zip(&pa)
            .filter(|(_, p)| **p * n as f64 >= 5.0)
            .map(|(o, p)| (o - p * n as f64).powi(2) / (p * n as f64))
            .sum();
        assert!(alone > quantile, "the samples also fit the first model alone (χ² {alone})");
    }
}
