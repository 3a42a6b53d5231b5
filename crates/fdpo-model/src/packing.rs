//! Padding-free packed batches with shared prefixes.
//!
//! A batch is a list of [`Sequence`]s: a prefix (the prompt) followed by one
//! or more branches (responses) that each see the prefix but not each
//! other. With one branch a sequence is the plain concatenation prompt +
//! response; with two (chosen and rejected) the prompt is computed once for
//! both, as in Wang & Hegde's prefix sharing (arXiv 2410.20305): the
//! rejected tokens' positions continue from the prompt's end, exactly as if
//! the chosen response were not there.
//!
//! Sequences are laid end to end in rows of at most `row_tokens` tokens, or
//! of the longest sequence's length if that is more (first fit, longest
//! first),
//! each token's position restarting at its own sequence, and the additive
//! mask lets a token see only its own sequence's prefix and branch. Rows
//! are filled to the longest row; the few filler tokens at row ends see
//! only themselves and are never a target. The attention kernel's query
//! blocks skip the keys their rows cannot see, so a packed row costs about
//! what its sequences would cost apart.
//!
//! What a batch scores is listed, not masked: [`Targets`] names each
//! predicted token, the flat position whose hidden state predicts it and
//! the branch it belongs to, so the LM head runs only there
//! ([`crate::logprobs::target_logprob_sums`]).

use candle_core::{Device, Tensor};

/// How a trainer lays out its micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Sequences packed end to end without padding (TRL's `padding_free`);
    /// otherwise one right-padded row per sequence.
    pub padding_free: bool,
    /// With `padding_free`: a pair's prompt computed once for both responses.
    pub prefix_sharing: bool,
}

impl Default for Batching {
    /// Packed, prompts shared: the same loss as padded rows, less work.
    fn default() -> Self {
        Batching { padding_free: true, prefix_sharing: true }
    }
}

impl Batching {
    /// One right-padded row per sequence.
    pub const PADDED: Batching = Batching { padding_free: false, prefix_sharing: false };
}

/// Tokens per packed row: sequences are laid end to end up to this many (a
/// longer one gets a row of its own). Attention's query blocks skip keys
/// their rows cannot see, so wider rows cost little more than their
/// sequences; the additive mask (width² floats a row) is what bounds it.
pub const ROW_TOKENS: usize = 1024;

/// One prefix and the branches that continue it.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    /// Tokens every branch sees (the prompt).
    pub prefix: &'a [u32],
    /// Continuations that see the prefix but not each other.
    pub branches: &'a [&'a [u32]],
}

impl Sequence<'_> {
    /// Tokens the sequence occupies in a row.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.branches.iter().map(|b| b.len()).sum::<usize>()
    }

    /// Whether it occupies no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tokens a batch predicts: hidden state `at[i]` (flat over rows ×
/// width) predicts token `token[i]`, which belongs to branch `owner[i]`
/// (branches numbered in order over the sequences, then within each).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    /// Flat index (row · width + column) of the predicting position.
    pub at: Vec<u32>,
    /// The predicted token.
    pub token: Vec<u32>,
    /// Its branch.
    pub owner: Vec<u32>,
    /// Number of branches.
    pub owners: usize,
}

/// What a packed batch predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scored {
    /// The branches' tokens (a response's log-probability).
    Branches,
    /// The prefix's tokens too, counted to the sequence's one branch
    /// (language modelling on the whole text).
    Whole,
}

/// Rows of packed sequences, ready for [`crate::CausalLm::forward_packed`].
#[derive(Debug, Clone)]
pub struct PackedBatch {
    /// Token ids (rows, width) u32.
    pub ids: Tensor,
    /// Each token's position within its own sequence (rows, width) u32.
    pub positions: Tensor,
    /// Additive attention mask (rows, 1, width, width): 0 where a token may
    /// see a key, a large negative number elsewhere.
    pub mask: Tensor,
    /// What the batch predicts.
    pub targets: Targets,
    /// Flat index of each branch's last token (the prefix's last when the
    /// branch is empty): where a sequence-classification head reads.
    pub last: Vec<u32>,
    /// Tokens of the sequences (filler excluded): the work done.
    pub tokens: usize,
    /// The longest position used, plus one.
    pub max_position: usize,
}

/// Where one sequence lies: row, first column.
#[derive(Debug, Clone, Copy)]
struct Placed {
    row: usize,
    start: usize,
}

/// First fit, longest first: the row and column of each sequence and each
/// row's fill. Deterministic (ties keep the input order).
fn place(lengths: &[usize], row_tokens: usize) -> (Vec<Placed>, Vec<usize>) {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut fill: Vec<usize> = vec![];
    let mut placed = vec![Placed { row: 0, start: 0 }; lengths.len()];
    for i in order {
        let len = lengths[i];
        let row = match fill.iter().position(|&f| f + len <= row_tokens) {
            Some(row) => row,
            None => {
                fill.push(0);
                fill.len() - 1
            }
        };
        placed[i] = Placed { row, start: fill[row] };
        fill[row] += len;
    }
    (placed, fill)
}

/// Mask value of a key a token may not see (as `layers::attention_mask`).
const HIDDEN: f32 = f32::MIN / 2.0;

impl PackedBatch {
    /// Packs `sequences` into rows of at most `row_tokens` tokens, or of the
    /// longest sequence's length if that is more. With [`Scored::Whole`] every
    /// sequence must have exactly one branch.
    pub fn new(
        sequences: &[Sequence],
        row_tokens: usize,
        scored: Scored,
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<PackedBatch> {
        if scored == Scored::Whole && sequences.iter().any(|s| s.branches.len() != 1) {
            candle_core::bail!("packing: whole-text scoring needs one branch per sequence");
        }
        let lengths: Vec<usize> = sequences.iter().map(Sequence::len).collect();
        // Rows are as wide as the widest: one longer sequence widens them
        // all, so the others may fill that width too.
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let (placed, fill) = place(&lengths, row_tokens.max(longest).max(1));
        let rows = fill.len().max(1);
        let width = fill.iter().copied().max().unwrap_or(0).max(1);
        let mut ids = vec![pad_id; rows * width];
        // Filler: position 0, seeing only itself.
        let mut positions = vec![0u32; rows * width];
        let mut mask = vec![HIDDEN; rows * width * width];
        for i in 0..rows * width {
            mask[i * width + i % width] = 0.0;
        }
        let mut targets =
            Targets { owners: sequences.iter().map(|s| s.branches.len()).sum(), ..Targets::default() };
        let mut last = Vec::with_capacity(targets.owners);
        let mut owner = 0u32;
        let mut max_position = 0;
        for (s, at) in sequences.iter().zip(&placed) {
            let base = at.row * width;
            let p = s.prefix.len();
            // Token `col` (a column of the row) sees keys in `seen`, causally.
            let mut see = |col: usize, seen: &[std::ops::Range<usize>]| {
                let row = &mut mask[(base + col) * width..(base + col + 1) * width];
                row[col] = HIDDEN;
                for r in seen {
                    row[r.start..r.end.min(col + 1)].iter_mut().for_each(|m| *m = 0.0);
                }
            };
            let prefix = at.start..at.start + p;
            for (j, &id) in s.prefix.iter().enumerate() {
                let col = at.start + j;
                ids[base + col] = id;
                positions[base + col] = j as u32;
                see(col, std::slice::from_ref(&prefix));
                if scored == Scored::Whole && j > 0 {
                    targets.at.push((base + col - 1) as u32);
                    targets.token.push(id);
                    targets.owner.push(owner);
                }
            }
            let mut start = prefix.end;
            for branch in s.branches {
                let own = start..start + branch.len();
                for (j, &id) in branch.iter().enumerate() {
                    let col = start + j;
                    ids[base + col] = id;
                    positions[base + col] = (p + j) as u32;
                    see(col, &[prefix.clone(), own.clone()]);
                    // Token j is predicted by the one before it in its view:
                    // the prefix's last for j = 0 (none if the prefix is empty).
                    let before = if j > 0 { Some(col - 1) } else { p.checked_sub(1).map(|k| at.start + k) };
                    if let Some(before) = before {
                        targets.at.push((base + before) as u32);
                        targets.token.push(id);
                        targets.owner.push(owner);
                    }
                }
                let end = if branch.is_empty() { prefix.end } else { own.end };
                last.push((base + end.saturating_sub(1).max(at.start)) as u32);
                max_position = max_position.max(p + branch.len());
                start = own.end;
                owner += 1;
            }
            max_position = max_position.max(p);
        }
        Ok(PackedBatch {
            ids: Tensor::from_vec(ids, (rows, width), device)?,
            positions: Tensor::from_vec(positions, (rows, width), device)?,
            mask: Tensor::from_vec(mask, (rows, 1, width, width), device)?,
            targets,
            last,
            tokens: lengths.iter().sum(),
            max_position,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placement: first fit, longest first (a sequence longer than the
    /// capacity would have its own row; `PackedBatch::new` widens the
    /// capacity to the longest instead).
    #[test]
    fn sequences_fill_rows_first_fit_longest_first() {
        let (placed, fill) = place(&[3, 9, 4, 12, 2], 10);
        let rows: Vec<(usize, usize)> = placed.iter().map(|p| (p.row, p.start)).collect();
        // 12 → row 0 (alone), 9 → row 1, 4 → row 2, 3 → row 2, 2 → row 2.
        assert_eq!(rows, [(2, 4), (1, 0), (2, 0), (0, 0), (2, 7)]);
        assert_eq!(fill, [12, 9, 9]);
    }

    /// Prefix sharing: the rejected tokens see the prompt and themselves,
    /// never the chosen response; positions continue from the prompt; the
    /// first token of each response is predicted by the prompt's last.
    #[test]
    fn shared_prefix_layout_positions_mask_and_targets() {
        let (prompt, chosen, rejected) = ([1u32, 2], [3u32, 4, 5], [6u32, 7]);
        let branches: [&[u32]; 2] = [&chosen, &rejected];
        let single: [&[u32]; 1] = [&[8, 9]];
        let seqs =
            [Sequence { prefix: &prompt, branches: &branches }, Sequence { prefix: &[], branches: &single }];
        let b = PackedBatch::new(&seqs, 16, Scored::Branches, 0, &Device::Cpu).unwrap();
        assert_eq!(b.ids.to_vec2::<u32>().unwrap(), [[1, 2, 3, 4, 5, 6, 7, 8, 9]]);
        assert_eq!(b.positions.to_vec2::<u32>().unwrap(), [[0, 1, 2, 3, 4, 2, 3, 0, 1]]);
        let m = b.mask.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let sees = |i: usize| -> Vec<usize> { (0..9).filter(|&j| m[i][j] == 0.0).collect() };
        assert_eq!(sees(1), [0, 1]);
        assert_eq!(sees(4), [0, 1, 2, 3, 4]);
        assert_eq!(sees(6), [0, 1, 5, 6]);
        assert_eq!(sees(8), [7, 8]);
        // chosen: 3 ← 1, 4 ← 2, 5 ← 3; rejected: 6 ← 1 (the prompt's last), 7 ← 5;
        // the third sequence has no prompt, so token 8 has no predictor.
        assert_eq!(b.targets.at, [1, 2, 3, 1, 5, 7]);
        assert_eq!(b.targets.token, [3, 4, 5, 6, 7, 9]);
        assert_eq!(b.targets.owner, [0, 0, 0, 1, 1, 2]);
        assert_eq!((b.targets.owners, b.last.clone(), b.tokens, b.max_position), (3, vec![4, 6, 8], 9, 5));
    }

    /// Whole-text scoring counts the prompt's tokens after its first;
    /// filler at a row's end sees only itself and is never a target.
    #[test]
    fn whole_text_scoring_and_filler() {
        let r1: [&[u32]; 1] = [&[3, 4]];
        let r2: [&[u32]; 1] = [&[7]];
        let seqs = [Sequence { prefix: &[1, 2], branches: &r1 }, Sequence { prefix: &[5, 6], branches: &r2 }];
        let b = PackedBatch::new(&seqs, 4, Scored::Whole, 99, &Device::Cpu).unwrap();
        assert_eq!(b.ids.to_vec2::<u32>().unwrap(), [[1, 2, 3, 4], [5, 6, 7, 99]]);
        assert_eq!(b.targets.at, [0, 1, 2, 4, 5]);
        assert_eq!(b.targets.token, [2, 3, 4, 6, 7]);
        assert_eq!(b.targets.owner, [0, 0, 0, 1, 1]);
        let m = b.mask.narrow(0, 1, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let sees: Vec<usize> = (0..4).filter(|&j| m[3 * 4 + j] == 0.0).collect();
        assert_eq!(sees, [3]);
        let two: [&[u32]; 2] = [&[1], &[2]];
        let bad = [Sequence { prefix: &[1], branches: &two }];
        assert!(PackedBatch::new(&bad, 4, Scored::Whole, 0, &Device::Cpu).is_err());
    }
}
