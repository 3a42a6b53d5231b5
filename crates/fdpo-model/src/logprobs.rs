//! Sequence log-probabilities of responses given prompts.
//!
//! Convention (the trainer's too, as in TRL): prompt and response are
//! tokenised separately — the prompt with the tokenizer's special tokens
//! (e.g. Llama's BOS), the response without — and concatenated. A response's
//! log-probability is Σ_j log π(y_j | prompt, y_<j) over its tokens; the
//! entropy is that of the model's next-token distribution at the same
//! positions.

use candle_core::{DType, Device, Tensor, D};

use crate::packing::Targets;
use crate::{CausalLm, ModelError};

/// Log-probability of one response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequenceLogprob {
    /// Σ log π over the response tokens.
    pub logprob_sum: f64,
    /// The same divided by the token count (0 for an empty response).
    pub logprob_mean: f64,
    /// Response tokens.
    pub tokens: usize,
    /// Mean entropy (nats) of the next-token distribution over the response.
    pub entropy_mean: f64,
}

/// Why a (prompt, response) pair cannot be scored whole: a response token
/// is predicted from the token before it, so with an empty prompt (plain
/// text under a tokenizer that adds no BOS, as GPT-2's and Qwen2's) the
/// response's first token has no context and no log-probability.
pub const NO_CONTEXT: &str =
    "prompt is empty and the tokenizer adds no BOS token, so the response's first token has no context";

/// Whether every token of `response` is predicted from something: false
/// for an empty `prompt` before a non-empty response (see [`NO_CONTEXT`]).
pub fn has_context(prompt: &[u32], response: &[u32]) -> bool {
    !prompt.is_empty() || response.is_empty()
}

/// logits (b, t, V), ids (b, t) u32, response_mask (b, t) f32 (1 on response
/// tokens) → (Σ log π of response tokens (b,), Σ entropy at those positions
/// (b,), token count (b,)). Token j is predicted from logits at j − 1.
/// Differentiable in `logits`.
pub fn response_logprobs(
    logits: &Tensor,
    ids: &Tensor,
    response_mask: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (logp, target, mask) = shifted(logits, ids, response_mask)?;
    let picked = logp.gather(&target.unsqueeze(2)?, 2)?.squeeze(2)?;
    let entropy = (logp.exp()? * &logp)?.sum(D::Minus1)?.neg()?;
    let sum = (picked * &mask)?.sum(1)?;
    let entropy_sum = (entropy * &mask)?.sum(1)?;
    Ok((sum, entropy_sum, mask.sum(1)?))
}

/// As [`response_logprobs`] without the entropy (what training needs):
/// (Σ log π of response tokens (b,), token count (b,)).
pub fn response_logprob_sums(
    logits: &Tensor,
    ids: &Tensor,
    response_mask: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    // Position j predicts token j + 1; the last position predicts nothing
    // (target 0, masked), so the logits are used whole, without a copy.
    let (b, t, _) = logits.dims3()?;
    let next =
        Tensor::cat(&[&ids.narrow(1, 1, t - 1)?, &Tensor::zeros((b, 1), DType::U32, ids.device())?], 1)?;
    let mask = Tensor::cat(
        &[&response_mask.narrow(1, 1, t - 1)?, &Tensor::zeros((b, 1), response_mask.dtype(), ids.device())?],
        1,
    )?
    .to_dtype(logits.dtype())?;
    let picked = crate::fused::target_logprobs(logits, &next)?;
    Ok(((picked * &mask)?.sum(1)?, mask.sum(1)?))
}

/// As [`response_logprob_sums`] from the final hidden states (b, t, h) of
/// a padded batch: the LM head runs only at the positions that predict a
/// response token (see [`target_logprob_sums`]).
pub fn response_logprob_sums_from_hidden(
    model: &CausalLm,
    hidden: &Tensor,
    ids: &Tensor,
    response_mask: &Tensor,
) -> Result<(Tensor, Tensor), ModelError> {
    let (b, t, _) = hidden.dims3()?;
    let mask = response_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let tokens = ids.to_vec2::<u32>()?;
    // Position j predicts token j + 1: kept where that token is a response token.
    let mut targets = Targets { owners: b, ..Targets::default() };
    for bi in 0..b {
        for j in 0..t.saturating_sub(1) {
            if mask[bi][j + 1] > 0.0 {
                targets.at.push((bi * t + j) as u32);
                targets.token.push(tokens[bi][j + 1]);
                targets.owner.push(bi as u32);
            }
        }
    }
    target_logprob_sums(model, hidden, &targets)
}

/// Σ log π of each owner's target tokens and their count, ((owners,),
/// (owners,)), from the final hidden states (…, h): the LM head runs only
/// at the positions that predict a target, a chunk of rows at a time
/// ([`crate::fused::head_target_logprobs`]). A prompt's positions need no
/// logits, so with prompt and response of equal length this halves the
/// head's work (forward and backward) and the (tokens × vocab) buffers.
/// Differentiable in `hidden` and the head. The one log-probability path
/// of training: the policy, the reference and SFT all come here.
pub fn target_logprob_sums(
    model: &CausalLm,
    hidden: &Tensor,
    targets: &Targets,
) -> Result<(Tensor, Tensor), ModelError> {
    let device = hidden.device();
    let h = hidden.dim(candle_core::D::Minus1)?;
    let mut counts = vec![0f32; targets.owners];
    targets.owner.iter().for_each(|&o| counts[o as usize] += 1.0);
    let counts = Tensor::from_vec(counts, targets.owners, device)?;
    let r = targets.at.len();
    if r == 0 {
        return Ok((Tensor::zeros(targets.owners, DType::F32, device)?, counts));
    }
    let at = Tensor::from_vec(targets.at.clone(), r, device)?;
    let picked_hidden = hidden.reshape(((), h))?.index_select(&at, 0)?;
    let tokens = Tensor::from_vec(targets.token.clone(), r, device)?;
    let picked = match model.head_weight() {
        // The head's product and the log-softmax in chunks of rows: the
        // (targets × vocab) logits are never stored.
        Some(w) => crate::fused::head_target_logprobs(&picked_hidden, w, &tokens)?,
        None => crate::fused::target_logprobs(&model.head(&picked_hidden)?.to_dtype(DType::F32)?, &tokens)?,
    };
    let owner = Tensor::from_vec(targets.owner.clone(), r, device)?;
    let sums = Tensor::zeros(targets.owners, DType::F32, device)?.index_add(&owner, &picked, 0)?;
    Ok((sums, counts))
}

/// log-softmax of the logits that predict tokens 1.., those tokens, and the
/// mask over them.
fn shifted(
    logits: &Tensor,
    ids: &Tensor,
    response_mask: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (_, t, _) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?, D::Minus1)?;
    let target = ids.narrow(1, 1, t - 1)?.contiguous()?;
    let mask = response_mask.narrow(1, 1, t - 1)?.to_dtype(logp.dtype())?;
    Ok((logp, target, mask))
}

/// A right-padded batch of prompt + response sequences.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// Token ids (b, t) u32, padding with the pad id.
    pub ids: Tensor,
    /// 1 on real tokens, 0 on padding (b, t) u8.
    pub attention: Tensor,
    /// 1 on response tokens (b, t) f32.
    pub response: Tensor,
    /// Real tokens in the batch.
    pub tokens: usize,
}

impl PaddedBatch {
    /// Concatenates each (prompt, response) and pads on the right; with
    /// `whole` the mask covers the prompt too (loss on every token).
    pub fn new(
        pairs: &[(&[u32], &[u32])],
        pad_id: u32,
        whole: bool,
        device: &Device,
    ) -> candle_core::Result<PaddedBatch> {
        let width = pairs.iter().map(|(p, r)| p.len() + r.len()).max().unwrap_or(0).max(2);
        let (mut ids, mut attention, mut response) = (Vec::new(), Vec::new(), Vec::new());
        let mut tokens = 0;
        for (p, r) in pairs {
            let len = p.len() + r.len();
            tokens += len;
            let start = if whole { 0 } else { p.len() };
            ids.extend(p.iter().chain(r.iter()).copied().chain(std::iter::repeat_n(pad_id, width - len)));
            attention.extend((0..width).map(|j| u8::from(j < len)));
            response.extend((0..width).map(|j| if j >= start && j < len { 1f32 } else { 0.0 }));
        }
        let b = pairs.len();
        Ok(PaddedBatch {
            ids: Tensor::from_vec(ids, (b, width), device)?,
            attention: Tensor::from_vec(attention, (b, width), device)?,
            response: Tensor::from_vec(response, (b, width), device)?,
            tokens,
        })
    }
}

/// Log-probabilities of (prompt ids, response ids) pairs in one right-padded
/// batch (no gradient is kept).
pub fn sequence_logprobs(
    model: &CausalLm,
    pairs: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
    device: &Device,
) -> Result<Vec<SequenceLogprob>, ModelError> {
    if pairs.is_empty() {
        return Ok(vec![]);
    }
    let refs: Vec<(&[u32], &[u32])> = pairs.iter().map(|(p, r)| (p.as_slice(), r.as_slice())).collect();
    let batch = PaddedBatch::new(&refs, pad_id, false, device)?;
    let b = pairs.len();
    let (ids, response) = (batch.ids, batch.response);
    let logits = model.forward(&ids, Some(&batch.attention), None)?.to_dtype(DType::F32)?;
    let (sum, entropy, count) = response_logprobs(&logits, &ids, &response)?;
    let (sum, entropy, count) = (sum.to_vec1::<f32>()?, entropy.to_vec1::<f32>()?, count.to_vec1::<f32>()?);
    Ok((0..b)
        .map(|i| {
            let n = count[i] as usize;
            let per = |x: f32| if n > 0 { x as f64 / n as f64 } else { 0.0 };
            SequenceLogprob {
                logprob_sum: sum[i] as f64,
                logprob_mean: per(sum[i]),
                tokens: n,
                entropy_mean: per(entropy[i]),
            }
        })
        .collect())
}
