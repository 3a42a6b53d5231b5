//! Attention and rotary embeddings on the CPU, fused, with their own
//! backward passes.
//!
//! One attention kernel serves two layouts. Head-major: q (b, h, t, d), k
//! and v (b, kv, s, d), any strides with contiguous rows, views of the KV
//! cache's buffers among them. Packed: the output of one q/k/v projection,
//! (b, t, (h + 2·kv)·d), each token's queries, then keys, then values, read
//! in place, and the result token-major (b, t, h·d), ready for the output
//! projection. In the packed layout a decoder layer needs no split,
//! transpose or copy around attention: each of those was an autograd node,
//! and candle's backward allocates a zeroed buffer and adds into it for
//! every node. Grouped-query attention (kv < h) reads each key/value head
//! for its h/kv query heads in place instead of repeating it.
//!
//! Rotary embeddings ("rotate half", Llama and Qwen2) run on token-major
//! (b, t, n·d) tensors: the first heads of each token are rotated, the rest
//! copied, so a packed projection is rotated in one pass.

use std::sync::Arc;

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fused::{data, fused, gemm_into, ids};
use crate::layers::repeat_kv;
use crate::vmath;

// ---------------------------------------------------------------- layouts

/// Where the rows of one operand lie in its buffer: row r of head `hd` of
/// batch row `bi` starts at `start + bi·batch + hd·head + r·row`; its d
/// columns are contiguous.
#[derive(Debug, Clone, Copy)]
struct Rows {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
}

impl Rows {
    /// A (b, heads, rows, d) layout whose columns are contiguous.
    fn of(l: &Layout) -> Option<Rows> {
        let (_, _, _, d) = l.shape().dims4().ok()?;
        let st = l.stride();
        if d > 1 && st[3] != 1 {
            return None;
        }
        Some(Rows { start: l.start_offset(), batch: st[0], head: st[1], row: st[2] })
    }

    /// A contiguous (b, heads, rows, d) buffer starting at `start`.
    fn head_major(start: usize, heads: usize, rows: usize, d: usize) -> Rows {
        Rows { start, batch: heads * rows * d, head: rows * d, row: d }
    }

    /// Heads `first`, `first + 1`, … of a token-major buffer holding
    /// `width` floats per token and `rows` tokens per batch row.
    fn packed(rows: usize, width: usize, d: usize, first: usize) -> Rows {
        Rows { start: first * d, batch: rows * width, head: d, row: width }
    }

    fn at(&self, bi: usize, hd: usize) -> usize {
        self.start + bi * self.batch + hd * self.head
    }

    /// Fails unless every row of a (b, heads, rows, d) operand lies within
    /// `len` floats (strides are non-negative: the last row is the farthest).
    fn check(&self, (b, heads, rows, d): (usize, usize, usize, usize), len: usize, what: &str) -> Result<()> {
        if b * heads * rows * d == 0 {
            return Ok(());
        }
        let end = self.at(b - 1, heads - 1) + (rows - 1) * self.row + d;
        if end > len {
            candle_core::bail!("attention: {what} reach float {end} of a buffer of {len}");
        }
        Ok(())
    }
}

/// Layouts of the queries, keys and values of one call (or of their gradients).
#[derive(Debug, Clone, Copy)]
struct Operands {
    q: Rows,
    k: Rows,
    v: Rows,
}

/// An output buffer written by parallel tasks, each to rows no other task writes.
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: the tasks sharing an `Out` write disjoint rows (one (batch,
// head) block each) and nothing reads the buffer until they are done.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// The f32 data of a CPU storage.
fn cpu_f32(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(s) => s.as_slice::<f32>(),
        _ => candle_core::bail!("fused attention: CPU tensors only"),
    }
}

// ---------------------------------------------------------------- rotation

/// `y` = `x` (one head, d values) rotated "rotate half" style by the angles
/// of one table row (`angles`: cos then sin of each frequency); `sign` −1
/// rotates back.
fn rotate(x: &[f32], y: &mut [f32], angles: &[f32], sign: f32) {
    // Split slices and zipped iterators: no bounds checks, so the loop
    // compiles to vector code (indexing `x[i + half]` kept it scalar).
    let half = x.len() / 2;
    let (cos, sin) = angles.split_at(half);
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    let pairs = x1.iter().zip(x2).zip(cos.iter().zip(sin));
    for ((y1, y2), ((&a, &b), (&c, &s))) in y1.iter_mut().zip(y2.iter_mut()).zip(pairs) {
        let s = sign * s;
        *y1 = a * c - b * s;
        *y2 = b * c + a * s;
    }
}

/// Rotary embedding applied to queries and keys as the attention kernel
/// reads them (packed layout): the table (positions × d) and the position
/// of every token (b × t), all checked to lie inside the table.
#[derive(Clone, Copy)]
struct Turn<'a> {
    table: &'a [f32],
    positions: &'a [u32],
}

impl Turn<'_> {
    /// The first `rows` rows (`rs` apart from `x`, d floats each) of one
    /// head of batch row `bi` (`t` tokens per batch row), rotated, as a
    /// contiguous rows × d buffer.
    ///
    /// # Safety
    /// `x` must address `rows` rows of d floats, `rs` apart.
    unsafe fn rotated(
        &self,
        (x, rs): (*const f32, usize),
        bi: usize,
        t: usize,
        rows: usize,
        d: usize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * d];
        for (r, y) in out.chunks_mut(d).enumerate() {
            let p = self.positions[bi * t + r] as usize;
            rotate(std::slice::from_raw_parts(x.add(r * rs), d), y, &self.table[p * d..(p + 1) * d], 1.0);
        }
        out
    }

    /// Rotates back, in place, rows 0..rows (`rs` apart from `x`) of one
    /// head of batch row `bi`: a gradient in the rotated frame → the input's.
    ///
    /// # Safety
    /// `x` must address `rows` rows of d floats, `rs` apart, that no one else touches.
    unsafe fn unrotate_in_place(
        &self,
        (x, rs): (*mut f32, usize),
        bi: usize,
        t: usize,
        rows: usize,
        d: usize,
    ) {
        let mut row = vec![0f32; d];
        for r in 0..rows {
            let p = self.positions[bi * t + r] as usize;
            let y = std::slice::from_raw_parts_mut(x.add(r * rs), d);
            row.copy_from_slice(y);
            rotate(&row, y, &self.table[p * d..(p + 1) * d], -1.0);
        }
    }
}

// ---------------------------------------------------------------- kernel

/// A block of query rows first..first + rows and the keys lo..lo + span
/// they may see (every key outside has probability exactly 0).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Block {
    first: usize,
    rows: usize,
    lo: usize,
    span: usize,
}

/// Query rows per block. Each block's scores stop at the last key any of
/// its rows may see (its span): under a causal mask the keys after it have
/// probability exactly 0, so computing them only to exponentiate −∞ is
/// waste (about 3/8 of the work at t = s = 128).
const QUERY_BLOCK: usize = 32;

/// Mask values at or below this are blocked (exp gives exactly 0).
const BLOCKED: f32 = -1e30;

/// Sizes, scale and mask of one attention call.
#[derive(Debug, Clone)]
struct Kernel {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    s: usize,
    d: usize,
    scale: f32,
    /// Additive mask, (mask_batch, t, s).
    mask: Arc<Vec<f32>>,
    mask_batch: usize,
    /// Per mask row and query block: keys lo..hi may have nonzero
    /// probability, (mask_batch, ⌈t / QUERY_BLOCK⌉).
    spans: Arc<Vec<(usize, usize)>>,
}

impl Kernel {
    /// `mask` must be (1 or b, 1, t, s).
    fn new((b, h, kv, t, s, d): (usize, usize, usize, usize, usize, usize), mask: &Tensor) -> Result<Kernel> {
        let mask_batch = mask.dim(0)?;
        let (mask, spans) = Self::plan(mask, t, s)?;
        Ok(Kernel { b, h, kv, t, s, d, scale: 1.0 / (d as f32).sqrt(), mask, mask_batch, spans })
    }

    /// The mask as f32 values and each query block's visible keys. Every
    /// layer of a forward pass attends under the same mask tensor: the plan
    /// of the last one seen is kept (by tensor id, which candle never
    /// reuses), so a packed batch's width² mask is read once per pass, not
    /// once per layer.
    #[allow(clippy::type_complexity)]
    fn plan(mask: &Tensor, t: usize, s: usize) -> Result<(Arc<Vec<f32>>, Arc<Vec<(usize, usize)>>)> {
        type Plan = (candle_core::TensorId, Arc<Vec<f32>>, Arc<Vec<(usize, usize)>>);
        static LAST: std::sync::Mutex<Option<Plan>> = std::sync::Mutex::new(None);
        if let Some((id, values, spans)) = LAST.lock().expect("not poisoned").as_ref() {
            if *id == mask.id() {
                return Ok((values.clone(), spans.clone()));
            }
        }
        let (mask_batch, mask_id) = (mask.dim(0)?, mask.id());
        let values = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mask = &values;
        // The keys a row may see, first to last; a row with no visible key
        // keeps all s (softmax of equal values: uniform, as the unfused
        // composition gives).
        let visible = |row: &[f32]| match row.iter().position(|&m| m > BLOCKED) {
            None => (0, s),
            Some(first) => (first, row.iter().rposition(|&m| m > BLOCKED).map_or(s, |j| j + 1)),
        };
        let spans: Vec<(usize, usize)> = (0..mask_batch)
            .flat_map(|mb| {
                let rows = &mask[mb * t * s..(mb + 1) * t * s];
                rows.chunks(QUERY_BLOCK * s).map(move |block| {
                    block.chunks(s).map(visible).fold((s, 0), |(lo, hi), (a, b)| (lo.min(a), hi.max(b)))
                })
            })
            .collect();
        let (values, spans) = (Arc::new(values), Arc::new(spans));
        *LAST.lock().expect("not poisoned") = Some((mask_id, values.clone(), spans.clone()));
        Ok((values, spans))
    }

    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.kv
    }

    /// Whether `mask` has the shape [`Kernel::new`] needs.
    fn mask_fits(mask: &Tensor, b: usize, t: usize, s: usize) -> bool {
        matches!(mask.dims4(), Ok((mb, 1, mt, ms)) if (mb == 1 || mb == b) && mt == t && ms == s)
    }

    fn check(&self, l: &Operands, lens: (usize, usize, usize)) -> Result<()> {
        let (b, h, kv, t, s, d) = (self.b, self.h, self.kv, self.t, self.s, self.d);
        l.q.check((b, h, t, d), lens.0, "queries")?;
        l.k.check((b, kv, s, d), lens.1, "keys")?;
        l.v.check((b, kv, s, d), lens.2, "values")
    }

    /// The query blocks of batch row `bi`: first row, row count, and the
    /// keys lo..hi its rows may see.
    fn blocks(&self, bi: usize) -> impl Iterator<Item = Block> + '_ {
        let per = self.t.div_ceil(QUERY_BLOCK);
        let spans = &self.spans[(bi % self.mask_batch) * per..][..per];
        spans.iter().enumerate().map(move |(i, &(lo, hi))| {
            let first = i * QUERY_BLOCK;
            Block { first, rows: QUERY_BLOCK.min(self.t - first), lo, span: hi - lo }
        })
    }

    /// The probabilities P (rows × span, rows `span` apart) of query rows
    /// first..first + rows of one head of batch row `bi` over keys
    /// lo..lo + span: scores, mask, softmax.
    ///
    /// # Safety
    /// `q` (t rows `q_rs` apart) and `k` (s rows `k_rs` apart) must hold d
    /// columns each; lo + span ≤ s, `p` at least rows × span.
    unsafe fn probs(
        &self,
        (q, q_rs): (*const f32, usize),
        (k, k_rs): (*const f32, usize),
        bi: usize,
        Block { first, rows, lo, span }: Block,
        p: &mut [f32],
    ) {
        let (t, s, d) = (self.t, self.s, self.d);
        let p = &mut p[..rows * span];
        // S = Q[rows] (rows × d) · K[lo..lo + span]ᵀ (d × span)
        let q = q.add(first * q_rs);
        gemm_into(
            rows,
            span,
            d,
            (p.as_mut_ptr(), span),
            false,
            (q, q_rs, 1),
            (k.add(lo * k_rs), 1, k_rs),
            Parallelism::None,
        );
        let mask = &self.mask[(bi % self.mask_batch) * t * s + first * s + lo..];
        for (row, mrow) in p.chunks_mut(span).zip(mask.chunks(s)) {
            row.iter_mut().zip(mrow).for_each(|(x, m)| *x = *x * self.scale + m);
            let max = vmath::max(row);
            row.iter_mut().for_each(|x| *x -= max);
            vmath::exp_in_place(row);
            let inv = 1.0 / vmath::sum(row);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// Y = P V per (batch row, query head) in parallel, written at `y`.
    ///
    /// # Safety
    /// The layouts must have passed [`Kernel::check`] for these buffers, and
    /// `y` must address a buffer holding every row of (b, h, t, d) in `y_rows`.
    unsafe fn forward(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        l: Operands,
        turn: Option<Turn>,
        y: Out,
        y_rows: Rows,
    ) {
        let (t, s, d) = (self.t, self.s, self.d);
        (0..self.b * self.h).into_par_iter().for_each(|bh| {
            let (bi, hd) = (bh / self.h, bh % self.h);
            let g = hd / self.group();
            let mut p = vec![0f32; QUERY_BLOCK * s];
            let (qr, kr);
            // SAFETY: offsets checked by the caller; each task writes its own block of y.
            unsafe {
                let (mut qh, mut kh) =
                    ((q.as_ptr().add(l.q.at(bi, hd)), l.q.row), (k.as_ptr().add(l.k.at(bi, g)), l.k.row));
                if let Some(turn) = turn {
                    (qr, kr) = (turn.rotated(qh, bi, t, t, d), turn.rotated(kh, bi, s, s, d));
                    (qh, kh) = ((qr.as_ptr(), d), (kr.as_ptr(), d));
                }
                let vp = v.as_ptr().add(l.v.at(bi, g));
                for block in self.blocks(bi) {
                    let Block { first, rows, lo, span } = block;
                    self.probs(qh, kh, bi, block, &mut p);
                    // Y[rows] (rows × d) = P (rows × span) · V[lo..lo + span] (span × d)
                    let yp = (y.at(y_rows.at(bi, hd) + first * y_rows.row), y_rows.row);
                    gemm_into(
                        rows,
                        d,
                        span,
                        yp,
                        false,
                        (p.as_ptr(), span, 1),
                        (vp.add(lo * l.v.row), l.v.row, 1),
                        Parallelism::None,
                    );
                }
            }
        });
    }

    /// dQ, dK, dV from dY, with P recomputed: dV = Σ Pᵀ dY, dP = dY Vᵀ,
    /// dS = P ⊙ (dP − rowsum(dP ⊙ P))·scale, dQ = dS K, dK = Σ dSᵀ Q, the
    /// sums over the query blocks and over the query heads sharing a
    /// key/value head. One task per (batch row, key/value head), so the sums
    /// need no synchronisation.
    ///
    /// # Safety
    /// As [`Kernel::forward`], for `dy` and for the gradients' layouts `gl`
    /// in `grads`, whose dK and dV rows must be zero on entry.
    unsafe fn backward(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        l: Operands,
        turn: Option<Turn>,
        (dy, dy_rows): (&[f32], Rows),
        grads: Out,
        gl: Operands,
    ) {
        let (t, s, d) = (self.t, self.s, self.d);
        (0..self.b * self.kv).into_par_iter().for_each(|bg| {
            let (bi, g) = (bg / self.kv, bg % self.kv);
            let (mut p, mut dp) = (vec![0f32; QUERY_BLOCK * s], vec![0f32; QUERY_BLOCK * s]);
            let none = Parallelism::None;
            // SAFETY: offsets checked by the caller; each task writes the
            // rows of its own key/value head and of the query heads in its group.
            unsafe {
                let mut kh = (k.as_ptr().add(l.k.at(bi, g)), l.k.row);
                let kr;
                if let Some(turn) = turn {
                    kr = turn.rotated(kh, bi, s, s, d);
                    kh = (kr.as_ptr(), d);
                }
                let vp = v.as_ptr().add(l.v.at(bi, g));
                let (dk, dv) = (grads.at(gl.k.at(bi, g)), grads.at(gl.v.at(bi, g)));
                for hd in g * self.group()..(g + 1) * self.group() {
                    let mut qh = (q.as_ptr().add(l.q.at(bi, hd)), l.q.row);
                    let qr;
                    if let Some(turn) = turn {
                        qr = turn.rotated(qh, bi, t, t, d);
                        qh = (qr.as_ptr(), d);
                    }
                    for block in self.blocks(bi) {
                        let Block { first, rows, lo, span } = block;
                        self.probs(qh, kh, bi, block, &mut p);
                        let qp = qh.0.add(first * qh.1);
                        // The keys, values and their gradients from key lo on.
                        let (kp, vp) = (kh.0.add(lo * kh.1), vp.add(lo * l.v.row));
                        let (dk, dv) = (dk.add(lo * gl.k.row), dv.add(lo * gl.v.row));
                        let dyp = dy.as_ptr().add(dy_rows.at(bi, hd) + first * dy_rows.row);
                        let dqp = grads.at(gl.q.at(bi, hd) + first * gl.q.row);
                        let (p, dp) = (&p[..rows * span], &mut dp[..rows * span]);
                        // dV[..span] += Pᵀ (span × rows) · dY[rows] (rows × d)
                        gemm_into(
                            span,
                            d,
                            rows,
                            (dv, gl.v.row),
                            true,
                            (p.as_ptr(), 1, span),
                            (dyp, dy_rows.row, 1),
                            none,
                        );
                        // dP (rows × span) = dY[rows] (rows × d) · V[..span]ᵀ (d × span)
                        gemm_into(
                            rows,
                            span,
                            d,
                            (dp.as_mut_ptr(), span),
                            false,
                            (dyp, dy_rows.row, 1),
                            (vp, 1, l.v.row),
                            none,
                        );
                        for (dp, p) in dp.chunks_mut(span).zip(p.chunks(span)) {
                            let dot: f32 = dp.iter().zip(p).map(|(a, b)| a * b).sum();
                            for (x, p) in dp.iter_mut().zip(p) {
                                *x = p * (*x - dot) * self.scale;
                            }
                        }
                        // dQ[rows] (rows × d) = dS (rows × span) · K[..span] (span × d)
                        gemm_into(
                            rows,
                            d,
                            span,
                            (dqp, gl.q.row),
                            false,
                            (dp.as_ptr(), span, 1),
                            (kp, kh.1, 1),
                            none,
                        );
                        // dK[..span] += dSᵀ (span × rows) · Q[rows] (rows × d)
                        gemm_into(
                            span,
                            d,
                            rows,
                            (dk, gl.k.row),
                            true,
                            (dp.as_ptr(), 1, span),
                            (qp, qh.1, 1),
                            none,
                        );
                    }
                    // dQ was taken in the rotated frame: rotate it back.
                    if let Some(turn) = turn {
                        turn.unrotate_in_place((grads.at(gl.q.at(bi, hd)), gl.q.row), bi, t, t, d);
                    }
                }
                if let Some(turn) = turn {
                    turn.unrotate_in_place((dk, gl.k.row), bi, s, s, d);
                }
            }
        });
    }
}

// ---------------------------------------------------------------- head-major

/// softmax(q kᵀ/√d + mask) v for q (b, h, t, d), k and v (b, kv, s, d)
/// with h a multiple of kv (grouped-query attention: query head i uses
/// key/value head i / (h / kv)), `mask` additive, (b or 1, 1, t, s).
/// Output (b, h, t, d). Keys and values may be views (e.g. of the KV
/// cache's buffers) as long as their rows are contiguous. Backward
/// recomputes the probabilities: nothing of size t × s is kept between the
/// passes. Other dtypes, devices or mask shapes take candle's ops.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kv, s, kd) = k.dims4()?;
    if kb != b || kd != d || k.dims() != v.dims() || kv == 0 || h % kv != 0 {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?}", q.dims(), k.dims(), v.dims());
    }
    if !fused(q) || !Kernel::mask_fits(mask, b, t, s) || q.elem_count() == 0 || s == 0 {
        let (k, v) = (repeat_kv(k.clone(), h / kv)?, repeat_kv(v.clone(), h / kv)?);
        let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * (1.0 / (d as f64).sqrt()))?
            .broadcast_add(mask)?;
        return crate::fused::softmax_last_dim(&scores)?.matmul(&v.contiguous()?);
    }
    let rows = |x: &Tensor| if Rows::of(x.layout()).is_some() { Ok(x.clone()) } else { x.contiguous() };
    rows(q)?.apply_op3(&rows(k)?, &rows(v)?, HeadMajor(Kernel::new((b, h, kv, t, s, d), mask)?))
}

struct HeadMajor(Kernel);

impl HeadMajor {
    fn operands(l1: &Layout, l2: &Layout, l3: &Layout) -> Result<Operands> {
        let rows = |l: &Layout| {
            Rows::of(l).ok_or_else(|| candle_core::Error::Msg("attention: rows must be contiguous".into()))
        };
        Ok(Operands { q: rows(l1)?, k: rows(l2)?, v: rows(l3)? })
    }
}

impl candle_core::CustomOp3 for HeadMajor {
    fn name(&self) -> &'static str {
        "fdpo-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = &self.0;
        let l = Self::operands(l1, l2, l3)?;
        let x = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?, s3.as_slice::<f32>()?);
        k.check(&l, (x.0.len(), x.1.len(), x.2.len()))?;
        let mut y = vec![0f32; k.b * k.h * k.t * k.d];
        // SAFETY: layouts checked against the buffers; y is (b, h, t, d).
        unsafe { k.forward(x, l, None, Out(y.as_mut_ptr()), Rows::head_major(0, k.h, k.t, k.d)) };
        Ok((CpuStorage::F32(y), Shape::from((k.b, k.h, k.t, k.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kn = &self.0;
        let g = g.contiguous()?;
        let ((qs, l1), (ks, l2), (vs, l3), (gs, gl)) =
            (q.storage_and_layout(), k.storage_and_layout(), v.storage_and_layout(), g.storage_and_layout());
        let l = Self::operands(l1, l2, l3)?;
        let x = (cpu_f32(&qs)?, cpu_f32(&ks)?, cpu_f32(&vs)?);
        kn.check(&l, (x.0.len(), x.1.len(), x.2.len()))?;
        let dy = cpu_f32(&gs)?;
        let dy_rows = Rows::head_major(gl.start_offset(), kn.h, kn.t, kn.d);
        dy_rows.check((kn.b, kn.h, kn.t, kn.d), dy.len(), "output gradient")?;
        // [dq | dk | dv], each contiguous.
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let mut grads = vec![0f32; nq + 2 * nk];
        let gl = Operands {
            q: Rows::head_major(0, kn.h, kn.t, kn.d),
            k: Rows::head_major(nq, kn.kv, kn.s, kn.d),
            v: Rows::head_major(nq + nk, kn.kv, kn.s, kn.d),
        };
        // SAFETY: inputs checked above; gl covers `grads` exactly.
        unsafe { kn.backward(x, l, None, (dy, dy_rows), Out(grads.as_mut_ptr()), gl) };
        drop((qs, ks, vs, gs));
        let all = Tensor::from_vec(grads, nq + 2 * nk, q.device())?;
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

// ---------------------------------------------------------------- packed

/// Attention on the packed output of a q/k/v projection: `qkv` (b, t,
/// (heads + 2·kv_heads)·d), each token's query heads, then key heads, then
/// value heads; `mask` (b or 1, 1, t, t). With `rope` (the table
/// (positions, d) of [`rope`] and the positions (b, t) u32), queries and
/// keys are rotated as the kernel reads them, which equals [`rope`] on the
/// q and k heads first (tested) without a rotated copy of `qkv` or a node
/// for it. Returns (b, t, heads·d), token-major. Backward returns the
/// gradient in the same packed layout. Equal to [`attention`] on the heads
/// split out and transposed (tested).
pub fn attention_packed(
    qkv: &Tensor,
    mask: &Tensor,
    heads: usize,
    kv_heads: usize,
    rope_table: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3()?;
    let n = heads + 2 * kv_heads;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || width % n != 0 {
        candle_core::bail!("attention: {heads} heads, {kv_heads} key/value heads, width {width}");
    }
    let d = width / n;
    if !fused(qkv) || !Kernel::mask_fits(mask, b, t, t) || qkv.elem_count() == 0 {
        let qkv = match rope_table {
            Some((table, positions)) => rope(qkv, table, positions, d, heads + kv_heads)?,
            None => qkv.clone(),
        };
        let part = |first: usize, count: usize| {
            qkv.narrow(2, first * d, count * d)?.reshape((b, t, count, d))?.transpose(1, 2)
        };
        let y =
            attention(&part(0, heads)?, &part(heads, kv_heads)?, &part(heads + kv_heads, kv_heads)?, mask)?;
        return y.transpose(1, 2)?.reshape((b, t, heads * d));
    }
    let turn = match rope_table {
        None => None,
        Some((table, positions)) => {
            let positions = positions.flatten_all()?.to_vec1::<u32>()?;
            let (rows, td) = table.dims2()?;
            if !d.is_multiple_of(2) || td != d || positions.len() != b * t {
                candle_core::bail!(
                    "attention: head_dim {d}, rotary table {:?}, {} positions",
                    table.dims(),
                    positions.len()
                );
            }
            if let Some(p) = positions.iter().find(|&&p| p as usize >= rows) {
                candle_core::bail!("rope: position {p} beyond the table ({rows})");
            }
            Some((table.to_dtype(DType::F32)?.contiguous()?, Arc::new(positions)))
        }
    };
    let kernel = Kernel::new((b, heads, kv_heads, t, t, d), mask)?;
    qkv.contiguous()?.apply_op1(Packed { kernel, turn })
}

struct Packed {
    kernel: Kernel,
    /// The rotary table (contiguous f32) and every token's position, checked.
    turn: Option<(Tensor, Arc<Vec<u32>>)>,
}

impl Packed {
    fn width(&self) -> usize {
        (self.kernel.h + 2 * self.kernel.kv) * self.kernel.d
    }

    /// Where queries, keys and values lie in a packed buffer.
    fn operands(&self) -> Operands {
        let (k, w) = (&self.kernel, self.width());
        Operands {
            q: Rows::packed(k.t, w, k.d, 0),
            k: Rows::packed(k.t, w, k.d, k.h),
            v: Rows::packed(k.t, w, k.d, k.h + k.kv),
        }
    }

    /// Runs `f` with the rotation (if any) borrowed from the table's storage.
    fn with_turn(&self, f: impl FnOnce(Option<Turn>)) -> Result<()> {
        match &self.turn {
            None => {
                f(None);
                Ok(())
            }
            Some((table, positions)) => {
                let (storage, layout) = table.storage_and_layout();
                let Some((start, end)) = layout.contiguous_offsets() else {
                    candle_core::bail!("attention: the rotary table must be contiguous");
                };
                let table = &cpu_f32(&storage)?[start..end];
                f(Some(Turn { table, positions }));
                Ok(())
            }
        }
    }
}

impl candle_core::CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "fdpo-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let k = &self.kernel;
        let x = data(s, l)?;
        let ops = self.operands();
        k.check(&ops, (x.len(), x.len(), x.len()))?;
        let mut y = vec![0f32; k.b * k.t * k.h * k.d];
        let y_rows = Rows::packed(k.t, k.h * k.d, k.d, 0);
        // SAFETY: layouts checked against x; y is (b, t, h·d); positions checked against the table.
        self.with_turn(|turn| unsafe { k.forward((x, x, x), ops, turn, Out(y.as_mut_ptr()), y_rows) })?;
        Ok((CpuStorage::F32(y), Shape::from((k.b, k.t, k.h * k.d))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let k = &self.kernel;
        let g = g.contiguous()?;
        let ((xs, xl), (gs, gl)) = (qkv.storage_and_layout(), g.storage_and_layout());
        let (x, dy) = (cpu_f32(&xs)?, cpu_f32(&gs)?);
        let at = |l: &Layout| l.contiguous_offsets().map(|(start, _)| start);
        let (Some(x0), Some(g0)) = (at(xl), at(gl)) else {
            candle_core::bail!("attention: packed input must be contiguous");
        };
        let x = &x[x0..];
        let ops = self.operands();
        k.check(&ops, (x.len(), x.len(), x.len()))?;
        let dy_rows = Rows { start: g0, ..Rows::packed(k.t, k.h * k.d, k.d, 0) };
        dy_rows.check((k.b, k.h, k.t, k.d), dy.len(), "output gradient")?;
        let mut grads = vec![0f32; k.b * k.t * self.width()];
        let out = Out(grads.as_mut_ptr());
        // SAFETY: inputs checked above; the packed layout covers `grads` exactly.
        self.with_turn(|turn| unsafe { k.backward((x, x, x), ops, turn, (dy, dy_rows), out, ops) })?;
        drop((xs, gs));
        Ok(Some(Tensor::from_vec(grads, (k.b, k.t, self.width()), qkv.device())?))
    }
}

// ---------------------------------------------------------------- RoPE

/// Rotary embedding ("rotate half") on token-major `x` (b, t, n·d): the
/// first `rotate` heads of every token are rotated by the angles of its
/// position, the other heads copied. `table` (positions, d) holds cos then
/// sin of each frequency, `positions` (b, t) u32. Backward is the inverse
/// rotation. f32 on the CPU.
pub fn rope(
    x: &Tensor,
    table: &Tensor,
    positions: &Tensor,
    head_dim: usize,
    rotate: usize,
) -> Result<Tensor> {
    let op = Rope { d: head_dim, rotate, inverse: false };
    x.contiguous()?.apply_op3(&table.contiguous()?, &positions.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct Rope {
    d: usize,
    rotate: usize,
    inverse: bool,
}

impl candle_core::CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fdpo-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, table, pos) = (data(s1, l1)?, data(s2, l2)?, ids(s3, l3)?);
        let (b, t, width) = l1.shape().dims3()?;
        let d = self.d;
        if d == 0 || !d.is_multiple_of(2) || width == 0 || width % d != 0 || self.rotate * d > width {
            candle_core::bail!("rope: head_dim {d}, {} rotated heads, width {width}", self.rotate);
        }
        if l2.dims().last() != Some(&d) || pos.len() != b * t {
            candle_core::bail!("rope: head_dim {d}, table {:?}, positions {:?}", l2.dims(), l3.dims());
        }
        let positions = table.len() / d;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(width).zip(x.par_chunks(width)).zip(pos.par_iter()).with_min_len(16).try_for_each(
            |((y, x), &p)| {
                let p = p as usize;
                if p >= positions {
                    candle_core::bail!("rope: position {p} beyond the table ({positions})");
                }
                let angles = &table[p * d..(p + 1) * d];
                let (yr, yc) = y.split_at_mut(self.rotate * d);
                let (xr, xc) = x.split_at(self.rotate * d);
                for (y, x) in yr.chunks_mut(d).zip(xr.chunks(d)) {
                    rotate(x, y, angles, sign);
                }
                yc.copy_from_slice(xc);
                Ok(())
            },
        )?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        table: &Tensor,
        positions: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx =
            g.contiguous()?.apply_op3_no_bwd(table, positions, &Rope { inverse: !self.inverse, ..*self })?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{close, uniform};
    use candle_core::{Device, Var, D};

    /// Additive mask (mb, 1, t, s): causal with s − t earlier keys, and in
    /// batch row 1 key 0 is padding.
    fn mask(mb: usize, t: usize, s: usize) -> Tensor {
        let allowed: Vec<f32> = (0..mb * t * s)
            .map(|i| {
                let (bi, i2) = (i / (t * s), i % (t * s));
                let (row, col) = (i2 / s, i2 % s);
                if col <= row + (s - t) && !(bi == 1 && col == 0) {
                    0.0
                } else {
                    f32::MIN / 2.0
                }
            })
            .collect();
        Tensor::from_vec(allowed, (mb, 1, t, s), &Device::Cpu).unwrap()
    }

    /// softmax(q kᵀ/√d + mask) v from candle's differentiable ops, key/value
    /// heads repeated for grouped queries.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        let (h, kv, d) = (q.dim(1).unwrap(), k.dim(1).unwrap(), q.dim(3).unwrap());
        let k = repeat_kv(k.contiguous().unwrap(), h / kv).unwrap();
        let v = repeat_kv(v.contiguous().unwrap(), h / kv).unwrap();
        let scores = (q.contiguous().unwrap().matmul(&k.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt()))
            .unwrap()
            .broadcast_add(mask)
            .unwrap();
        candle_nn::ops::softmax(&scores, D::Minus1).unwrap().matmul(&v).unwrap()
    }

    /// Values and every input's gradient of `fast` against `slow` under a
    /// loss Σ w·y that gives every output element its own gradient.
    fn same_with_gradients(fast: &Tensor, slow: &Tensor, vars: &[(&str, &Var)], what: &str) {
        close(fast, slow, &format!("{what} forward"));
        let w = uniform(fast.shape(), -1.0, 1.0, 99);
        let gf = (fast * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (slow * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in vars {
            let (a, b) = (gf.get(var.as_tensor()), gs.get(var.as_tensor()));
            close(a.unwrap(), b.unwrap(), &format!("{what} d{name}"));
        }
    }

    #[test]
    fn head_major_attention_matches_the_unfused_composition() {
        // Causal with padding (per-batch mask) and a shared mask; s ≠ t as
        // with a cache; grouped queries (h = 2·kv, h = 4·kv); odd sizes.
        for (b, h, kv, t, s, d, per_batch) in [
            (2, 3, 3, 5, 5, 4, true),
            (1, 2, 2, 3, 7, 5, false),
            (3, 1, 1, 9, 9, 8, true),
            (2, 4, 2, 6, 6, 3, true),
            (2, 4, 1, 3, 5, 6, false),
            // Several query blocks, each with its own span.
            (2, 2, 1, 70, 75, 4, true),
        ] {
            // Token-major buffers viewed head-major: strided rows, not contiguous.
            let x = |seed: u64, n: usize, heads: usize| {
                Var::from_tensor(&uniform((b, n, heads, d), -2.0, 2.0, seed).transpose(1, 2).unwrap())
                    .unwrap()
            };
            let (q, k, v) = (x(10, t, h), x(11, s, kv), x(12, s, kv));
            let m = mask(if per_batch { b } else { 1 }, t, s);
            let fast = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m).unwrap();
            let slow = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &m);
            let what = format!("attention b{b} h{h} kv{kv} t{t} s{s} d{d}");
            same_with_gradients(&fast, &slow, &[("q", &q), ("k", &k), ("v", &v)], &what);
            // Keys and values as views of a longer buffer (the KV cache's layout).
            let view = |x: &Var| {
                let junk = uniform((b, kv, 3, d), -9.0, 9.0, 14);
                let buffer = Tensor::cat(&[&x.as_tensor().contiguous().unwrap(), &junk], 2).unwrap();
                buffer.narrow(2, 0, s).unwrap()
            };
            let (kc, vc) = (view(&k), view(&v));
            assert!(!kc.is_contiguous() && Rows::of(kc.layout()).is_some());
            close(&attention(q.as_tensor(), &kc, &vc, &m).unwrap(), &slow, &format!("{what}, cache views"));
        }
    }

    /// Under a causal mask each query block's scores stop at its last
    /// visible key and start at its first; a row that sees no key keeps
    /// them all.
    #[test]
    fn query_blocks_stop_at_the_last_visible_key() {
        let (t, s) = (70, 75);
        let kernel = Kernel::new((2, 1, 1, t, s, 4), &mask(2, t, s)).unwrap();
        // Block rows 0..32 see keys up to 31 + 5, and so on; t − 64 = 6 rows in the last.
        let block = |first, rows, span| Block { first, rows, lo: 0, span };
        let expect = vec![block(0, 32, 37), block(32, 32, 69), block(64, 6, 75)];
        assert_eq!(kernel.blocks(0).collect::<Vec<_>>(), expect);
        // Batch row 1's key 0 is padding: its blocks start at key 1.
        let from_1: Vec<Block> = expect.iter().map(|b| Block { lo: 1, span: b.span - 1, ..*b }).collect();
        assert_eq!(kernel.blocks(1).collect::<Vec<_>>(), from_1);
        // Rows 0..32 may not see key 39: the first block stops at 39 …
        let spans = |blind_row_0: bool| {
            let mut m = vec![0f32; 40 * 40];
            (0..32).for_each(|row| m[row * 40 + 39] = f32::MIN / 2.0);
            if blind_row_0 {
                m[..40].iter_mut().for_each(|m| *m = f32::MIN / 2.0);
            }
            let m = Tensor::from_vec(m, (1, 1, 40, 40), &Device::Cpu).unwrap();
            let kernel = Kernel::new((1, 1, 1, 40, 40, 4), &m).unwrap();
            kernel.blocks(0).map(|b| b.lo + b.span).collect::<Vec<_>>()
        };
        assert_eq!(spans(false), [39, 40]);
        // … unless one of its rows sees no key at all (uniform over all 40).
        assert_eq!(spans(true), [40, 40]);
    }

    /// Sequences packed end to end, one of them a prompt shared by two
    /// responses that do not see each other: each query block's keys start
    /// at the first key one of its rows may see, and the result and every
    /// gradient equal the unfused composition's (spans of several blocks).
    #[test]
    fn packed_sequences_see_only_themselves() {
        // Row 0: a 45-token sequence, then prompt 30 | chosen 20 | rejected 25.
        // Row 1: one 70-token sequence, then 50 padding tokens seeing themselves.
        let t = 120;
        let visible = |bi: usize, i: usize, j: usize| -> bool {
            if bi == 1 {
                return if i < 70 { j <= i } else { j == i };
            }
            match i {
                _ if i < 45 => j <= i,
                _ if i < 95 => (45..=i).contains(&j),
                _ => (45..75).contains(&j) || (95..=i).contains(&j),
            }
        };
        let m: Vec<f32> = (0..2 * t * t)
            .map(|x| if visible(x / (t * t), x / t % t, x % t) { 0.0 } else { f32::MIN / 2.0 })
            .collect();
        let m = Tensor::from_vec(m, (2, 1, t, t), &Device::Cpu).unwrap();
        let kernel = Kernel::new((2, 1, 1, t, t, 4), &m).unwrap();
        let row0: Vec<(usize, usize)> = kernel.blocks(0).map(|b| (b.lo, b.lo + b.span)).collect();
        assert_eq!(row0, [(0, 32), (0, 64), (45, 96), (45, 120)]);
        let (h, kv, d) = (4, 2, 6);
        let qkv = Var::from_tensor(&uniform((2, t, (h + 2 * kv) * d), -2.0, 2.0, 31)).unwrap();
        let fast = attention_packed(qkv.as_tensor(), &m, h, kv, None).unwrap();
        let part = |first: usize, n: usize| {
            qkv.as_tensor()
                .narrow(2, first * d, n * d)
                .unwrap()
                .reshape((2, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        let slow = reference(&part(0, h), &part(h, kv), &part(h + kv, kv), &m)
            .transpose(1, 2)
            .unwrap()
            .reshape((2, t, h * d))
            .unwrap();
        same_with_gradients(&fast, &slow, &[("qkv", &qkv)], "packed sequences");
    }

    #[test]
    fn packed_attention_matches_the_unfused_composition() {
        for (b, h, kv, t, d, per_batch) in [
            (2, 3, 3, 5, 4, true),
            (1, 2, 2, 7, 5, false),
            (2, 4, 2, 6, 3, true),
            (3, 4, 1, 4, 2, false),
            (2, 2, 1, 67, 4, true),
        ] {
            // A transposed view: the op must not assume its input contiguous.
            let qkv = uniform((b, (h + 2 * kv) * d, t), -2.0, 2.0, 20).transpose(1, 2).unwrap();
            assert!(!qkv.is_contiguous());
            let qkv = Var::from_tensor(&qkv).unwrap();
            let m = mask(if per_batch { b } else { 1 }, t, t);
            let fast = attention_packed(qkv.as_tensor(), &m, h, kv, None).unwrap();
            assert_eq!(fast.dims(), [b, t, h * d]);
            let part = |first: usize, n: usize| {
                qkv.as_tensor()
                    .narrow(2, first * d, n * d)
                    .unwrap()
                    .reshape((b, t, n, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            };
            let slow = reference(&part(0, h), &part(h, kv), &part(h + kv, kv), &m)
                .transpose(1, 2)
                .unwrap()
                .reshape((b, t, h * d))
                .unwrap();
            let what = format!("packed attention b{b} h{h} kv{kv} t{t} d{d}");
            same_with_gradients(&fast, &slow, &[("qkv", &qkv)], &what);

            // With the rotation applied as the kernel reads q and k: equal to
            // rotating the q and k heads first (positions per row, as with
            // left padding; the table longer than the sequence).
            let table = uniform((t + 5, d), -1.0, 1.0, 21);
            let positions: Vec<u32> = (0..b * t)
                .map(|i| ((i % t) as u32).saturating_sub(2 * (i / t) as u32) + (i / t) as u32)
                .collect();
            let positions = Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap();
            let fast = attention_packed(qkv.as_tensor(), &m, h, kv, Some((&table, &positions)));
            if d % 2 == 1 {
                let err = fast.unwrap_err().to_string();
                assert!(err.contains(&format!("head_dim {d}")), "{err}");
                continue;
            }
            let fast = fast.unwrap();
            let rotated = rope(qkv.as_tensor(), &table, &positions, d, h + kv).unwrap();
            let slow = attention_packed(&rotated, &m, h, kv, None).unwrap();
            same_with_gradients(&fast, &slow, &[("qkv", &qkv)], &format!("{what}, rotated inside"));
        }
    }

    #[test]
    fn rope_matches_the_unfused_rotation_forward_and_backward() {
        let (b, t, n, d, max) = (2, 5, 4, 6, 9);
        for rotate in [1, 3, 4] {
            let x = Var::from_tensor(&uniform((b, n * d, t), -1.0, 1.0, 5).transpose(1, 2).unwrap()).unwrap();
            let cos = uniform((max, d / 2), -1.0, 1.0, 6);
            let sin = uniform((max, d / 2), -1.0, 1.0, 7);
            let table = Tensor::cat(&[&cos, &sin], 1).unwrap();
            let positions = Tensor::new(&[[0u32, 1, 2, 3, 4], [2, 3, 4, 5, 8]], &Device::Cpu).unwrap();
            // Unfused: per token gather cos/sin, x·cos + rotate_half(x)·sin
            // on the first `rotate` heads, the rest as they are.
            let gather = |tab: &Tensor| {
                let half = tab
                    .index_select(&positions.flatten_all().unwrap(), 0)
                    .unwrap()
                    .reshape((b, t, 1, d / 2))
                    .unwrap();
                Tensor::cat(&[&half, &half], 3).unwrap()
            };
            let heads = x.as_tensor().reshape((b, t, n, d)).unwrap();
            let turned = heads.narrow(2, 0, rotate).unwrap();
            let rotated = Tensor::cat(
                &[
                    &turned.narrow(3, d / 2, d / 2).unwrap().neg().unwrap(),
                    &turned.narrow(3, 0, d / 2).unwrap(),
                ],
                3,
            )
            .unwrap();
            let turned = (turned.broadcast_mul(&gather(&cos)).unwrap()
                + rotated.broadcast_mul(&gather(&sin)).unwrap())
            .unwrap();
            let slow = Tensor::cat(&[&turned, &heads.narrow(2, rotate, n - rotate).unwrap()], 2)
                .unwrap()
                .reshape((b, t, n * d))
                .unwrap();
            let fast = rope(x.as_tensor(), &table, &positions, d, rotate).unwrap();
            same_with_gradients(&fast, &slow, &[("x", &x)], &format!("rope, {rotate} of {n} heads"));
        }
        let x = uniform((1, 2, 12), -1.0, 1.0, 5);
        let table = uniform((3, 6), -1.0, 1.0, 6);
        let far = Tensor::new(&[[0u32, 3]], &Device::Cpu).unwrap();
        let err = rope(&x, &table, &far, 6, 2).unwrap_err().to_string();
        assert!(err.contains("position 3 beyond the table (3)"), "{err}");
    }
}
