//! Fused CPU kernels with their own backward passes (candle custom ops):
//! RMSNorm, LayerNorm, softmax over the last dimension, SwiGLU's silu(a)·b,
//! GELU (tanh approximation), and the
//! log-probability of target tokens (log-softmax + gather, what the
//! cross-entropy and f-DPO losses need). Each replaces a chain of
//! differentiable candle ops — and the intermediate tensors autograd keeps
//! for them — by one pass over the rows, parallel with rayon; backward is
//! one pass too. f32 on the CPU only: other dtypes and devices take the
//! unfused composition, which the tests also use as the reference.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::vmath;

/// Rows handed to one rayon task at least (below this, threads cost more than they save).
const MIN_ROWS: usize = 16;

/// Whether the fused kernels can run on `t` (f32 on the CPU).
pub(crate) fn fused(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu()
}

/// The f32 data of a contiguous layout.
pub(crate) fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: input must be contiguous".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

/// The u32 data of a contiguous layout.
pub(crate) fn ids<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: input must be contiguous".into()))?;
    Ok(&s.as_slice::<u32>()?[start..end])
}

/// Rows summed per task by [`column_sums`]: a fixed block, so that the
/// order of the floating-point additions does not depend on how rayon
/// happens to split the work (with rayon's own fold/reduce it did, and two
/// runs of the same seed trained different models).
const ROWS_PER_SUM: usize = 64;

/// Σ over rows of `add(acc, x_row, g_row)`, rows of n, in parallel and
/// deterministic: each fixed block of rows into its own partial sum, then
/// the partial sums in order. The weight gradients of the norms and the
/// bias gradient.
fn column_sums(x: &[f32], g: &[f32], n: usize, add: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = x
        .par_chunks(n * ROWS_PER_SUM)
        .zip(g.par_chunks(n * ROWS_PER_SUM))
        .map(|(x, g)| {
            let mut acc = vec![0f32; n];
            for (x, g) in x.chunks(n).zip(g.chunks(n)) {
                add(&mut acc, x, g);
            }
            acc
        })
        .collect();
    let mut total = vec![0f32; n];
    for p in &partials {
        total.iter_mut().zip(p).for_each(|(t, p)| *t += p);
    }
    total
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

// ---------------------------------------------------------------- RMSNorm

/// x (…, n) → x / √(mean(x²) + ε) · w, fused; the unfused path otherwise.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::rms_norm_slow(x, w, eps);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fdpo-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, n) = (data(s1, l1)?, data(s2, l2)?, last_dim(l1));
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(MIN_ROWS).for_each(|(y, x)| {
            let r = inv_rms(x, self.eps);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &RmsNormBackwardX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&g, &RmsNormBackwardW { eps: self.eps })?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx = r·(ŵ − x·r²·mean(ŵ·x)), ŵ = g·w, r = 1/rms(x).
struct RmsNormBackwardX {
    eps: f32,
}

impl candle_core::CustomOp3 for RmsNormBackwardX {
    fn name(&self) -> &'static str {
        "fdpo-rms-norm-backward-x"
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
        let (x, w, g, n) = (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, last_dim(l1));
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_chunks(n))).with_min_len(MIN_ROWS).for_each(
            |(dx, (x, g))| {
                let r = inv_rms(x, self.eps);
                let dot = x.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x).sum::<f32>() / n as f32;
                let c = r * r * dot;
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = r * (g * w - x * c);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// dw = Σ_rows g·x·r.
struct RmsNormBackwardW {
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNormBackwardW {
    fn name(&self) -> &'static str {
        "fdpo-rms-norm-backward-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g, n) = (data(s1, l1)?, data(s2, l2)?, last_dim(l1));
        let dw = column_sums(x, g, n, |acc, x, g| {
            let r = inv_rms(x, self.eps);
            for ((a, x), g) in acc.iter_mut().zip(x).zip(g) {
                *a += g * x * r;
            }
        });
        Ok((CpuStorage::F32(dw), Shape::from(n)))
    }
}

// ---------------------------------------------------------------- LayerNorm

/// x (…, n) → (x − mean)/√(var + ε) · w + b, fused; the unfused path otherwise.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::layer_norm_slow(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

struct LayerNorm {
    eps: f32,
}

/// (mean, 1/std) of a row.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl candle_core::CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fdpo-layer-norm"
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
        let (x, w, b, n) = (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, last_dim(l1));
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(MIN_ROWS).for_each(|(y, x)| {
            let (mean, r) = moments(x, self.eps);
            for (((y, x), w), b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * r * w + b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormBackwardX { eps: self.eps })?;
        let dw = x.apply_op2_no_bwd(&g, &LayerNormBackwardW { eps: self.eps })?;
        let db = row_sum(&g)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ĝ = g·w, x̂ = (x − mean)·r.
struct LayerNormBackwardX {
    eps: f32,
}

impl candle_core::CustomOp3 for LayerNormBackwardX {
    fn name(&self) -> &'static str {
        "fdpo-layer-norm-backward-x"
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
        let (x, w, g, n) = (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?, last_dim(l1));
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_chunks(n))).with_min_len(MIN_ROWS).for_each(
            |(dx, (x, g))| {
                let (mean, r) = moments(x, self.eps);
                let (mut sum_g, mut sum_gx) = (0f32, 0f32);
                for ((x, g), w) in x.iter().zip(g).zip(w) {
                    let gw = g * w;
                    sum_g += gw;
                    sum_gx += gw * (x - mean) * r;
                }
                let (mg, mgx) = (sum_g / n as f32, sum_gx / n as f32);
                for (((dx, x), g), w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    let xh = (x - mean) * r;
                    *dx = r * (g * w - mg - xh * mgx);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// dw = Σ_rows g·x̂.
struct LayerNormBackwardW {
    eps: f32,
}

impl candle_core::CustomOp2 for LayerNormBackwardW {
    fn name(&self) -> &'static str {
        "fdpo-layer-norm-backward-w"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g, n) = (data(s1, l1)?, data(s2, l2)?, last_dim(l1));
        let dw = column_sums(x, g, n, |acc, x, g| {
            let (mean, r) = moments(x, self.eps);
            for ((a, x), g) in acc.iter_mut().zip(x).zip(g) {
                *a += g * (x - mean) * r;
            }
        });
        Ok((CpuStorage::F32(dw), Shape::from(n)))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension, fused; the unfused path otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl candle_core::CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fdpo-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, n) = (data(s, l)?, last_dim(l));
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(MIN_ROWS).for_each(|(y, x)| {
            let max = vmath::max(x);
            y.iter_mut().zip(x).for_each(|(y, x)| *y = x - max);
            vmath::exp_in_place(y);
            let inv = 1.0 / vmath::sum(y);
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBackward)?))
    }
}

/// dx = y·(g − Σ g·y).
struct SoftmaxBackward;

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "fdpo-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g, n) = (data(s1, l1)?, data(s2, l2)?, last_dim(l1));
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).with_min_len(MIN_ROWS).for_each(
            |(dx, (y, g))| {
                let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - dot);
                }
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- SwiGLU

/// silu(a)·b, fused; the unfused path otherwise.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused(a) || a.dims() != b.dims() {
        return a.silu()? * b;
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, SiluMul)
}

struct SiluMul;

/// σ(a) for every element of `a`, into `s`.
fn sigmoid(a: &[f32], s: &mut [f32]) {
    s.iter_mut().zip(a).for_each(|(s, a)| *s = -a);
    vmath::exp_in_place(s);
    s.iter_mut().for_each(|s| *s = 1.0 / (1.0 + *s));
}

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fdpo-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (data(s1, l1)?, data(s2, l2)?);
        let mut y = vec![0f32; a.len()];
        y.par_chunks_mut(4096).zip(a.par_chunks(4096).zip(b.par_chunks(4096))).for_each(|(y, (a, b))| {
            sigmoid(a, y);
            for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                *y *= a * b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let da = a.apply_op3_no_bwd(b, &g, &SiluMulBackward { wrt_a: true })?;
        let db = a.apply_op3_no_bwd(b, &g, &SiluMulBackward { wrt_a: false })?;
        Ok((Some(da), Some(db)))
    }
}

/// da = g·b·σ(a)(1 + a(1 − σ(a))), db = g·silu(a).
struct SiluMulBackward {
    wrt_a: bool,
}

impl candle_core::CustomOp3 for SiluMulBackward {
    fn name(&self) -> &'static str {
        "fdpo-silu-mul-backward"
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
        let (a, b, g) = (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?);
        let mut d = vec![0f32; a.len()];
        let wrt_a = self.wrt_a;
        d.par_chunks_mut(4096)
            .zip(a.par_chunks(4096).zip(b.par_chunks(4096).zip(g.par_chunks(4096))))
            .for_each(|(d, (a, (b, g)))| {
                sigmoid(a, d);
                for (((d, a), b), g) in d.iter_mut().zip(a).zip(b).zip(g) {
                    let s = *d;
                    *d = if wrt_a { g * b * s * (1.0 + a * (1.0 - s)) } else { g * a * s };
                }
            });
        Ok((CpuStorage::F32(d), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- row sums

/// Σ over the rows of g (…, n) → (n,), in parallel and deterministic.
pub(crate) fn row_sum(g: &Tensor) -> Result<Tensor> {
    g.contiguous()?.apply_op1_no_bwd(&RowSum)
}

struct RowSum;

impl candle_core::CustomOp1 for RowSum {
    fn name(&self) -> &'static str {
        "fdpo-row-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, n) = (data(s, l)?, last_dim(l));
        let total = column_sums(g, g, n, |acc, _, g| acc.iter_mut().zip(g).for_each(|(a, g)| *a += g));
        Ok((CpuStorage::F32(total), Shape::from(n)))
    }
}

// ---------------------------------------------------------------- GELU

/// GELU with the tanh approximation (GPT-2's `gelu_new`; candle's `gelu`),
/// fused; the unfused path otherwise.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !fused(x) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(Gelu)
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// t = tanh(√(2/π)(x + 0.044715·x³)) for every element, as 1 − 2/(e^{2u} + 1).
fn gelu_tanh(x: &[f32], t: &mut [f32]) {
    t.iter_mut().zip(x).for_each(|(t, x)| *t = 2.0 * SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
    vmath::exp_in_place(t);
    t.iter_mut().for_each(|t| *t = 1.0 - 2.0 / (*t + 1.0));
}

struct Gelu;

impl candle_core::CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fdpo-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| {
            gelu_tanh(x, y);
            y.iter_mut().zip(x).for_each(|(y, x)| *y = 0.5 * x * (1.0 + *y));
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluBackward)?))
    }
}

/// dx = g·(½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715·x²)).
struct GeluBackward;

impl candle_core::CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fdpo-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (data(s1, l1)?, data(s2, l2)?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(g.par_chunks(4096))).for_each(|(d, (x, g))| {
            gelu_tanh(x, d);
            for ((d, x), g) in d.iter_mut().zip(x).zip(g) {
                let t = *d;
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x * x);
                *d = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- target log-probs

/// log softmax(logits)[target] per row: logits (…, V), targets (…) u32 →
/// (…). Fused (the (…, V) log-softmax is never stored); unfused otherwise.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if !fused(logits) {
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        return logp.gather(&targets.contiguous()?.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1);
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, TargetLogprobs)
}

struct TargetLogprobs;

/// (max x, Σ e^(x − max)), with `e` left holding e^(x − max).
fn exp_shifted(x: &[f32], e: &mut [f32]) -> (f32, f32) {
    let max = vmath::max(x);
    e.iter_mut().zip(x).for_each(|(e, x)| *e = x - max);
    vmath::exp_in_place(e);
    (max, vmath::sum(e))
}

impl candle_core::CustomOp2 for TargetLogprobs {
    fn name(&self) -> &'static str {
        "fdpo-target-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, t, v) = (data(s1, l1)?, ids(s2, l2)?, last_dim(l1));
        if x.len() != t.len() * v {
            candle_core::bail!("target_logprobs: {} targets for logits of shape {:?}", t.len(), l1.dims());
        }
        let mut out = vec![0f32; t.len()];
        out.par_iter_mut().zip(x.par_chunks(v).zip(t.par_iter())).with_min_len(MIN_ROWS).try_for_each_init(
            || vec![0f32; v],
            |e, (o, (row, &target))| {
                let target = target as usize;
                if target >= v {
                    return Err(candle_core::Error::Msg(format!(
                        "target id {target} outside the vocabulary ({v})"
                    )));
                }
                let (max, sum) = exp_shifted(row, e);
                *o = row[target] - (max + sum.ln());
                Ok(())
            },
        )?;
        let dims = &l1.dims()[..l1.dims().len() - 1];
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(x.apply_op3_no_bwd(t, &g.contiguous()?, &TargetLogprobsBackward)?), None))
    }
}

/// dlogits = g·(onehot(target) − softmax(logits)).
struct TargetLogprobsBackward;

impl candle_core::CustomOp3 for TargetLogprobsBackward {
    fn name(&self) -> &'static str {
        "fdpo-target-logprobs-backward"
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
        let (x, t, g, v) = (data(s1, l1)?, ids(s2, l2)?, data(s3, l3)?, last_dim(l1));
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v).zip(t.par_iter().zip(g.par_iter())))
            .with_min_len(MIN_ROWS)
            .for_each(|(dx, (row, (&target, &g)))| {
                if g == 0.0 {
                    return;
                }
                let (_, sum) = exp_shifted(row, dx);
                let scale = -g / sum;
                dx.iter_mut().for_each(|d| *d *= scale);
                dx[target as usize] += g;
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- LM head + target log-probs

/// Rows of logits computed at a time by [`head_target_logprobs`].
const HEAD_CHUNK: usize = 128;

/// log softmax(hidden · weightᵀ)[target] per row: hidden (r, h), weight
/// (V, h) (an LM head without bias), targets (r,) u32 → (r,). The (r × V)
/// logits are never stored: forward and backward compute them
/// `HEAD_CHUNK` rows at a time, so the LM head costs (chunk × V) floats of
/// memory, not three (r × V) buffers (logits, their gradient, the
/// softmax): ~4 GB at a 152k vocabulary and 2,400 target tokens. Backward
/// recomputes each chunk's logits (one more head product). Unfused (the
/// product, then [`target_logprobs`]) for other dtypes or devices.
pub fn head_target_logprobs(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    head_target_logprobs_in(hidden, weight, targets, HEAD_CHUNK)
}

fn head_target_logprobs_in(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    chunk: usize,
) -> Result<Tensor> {
    let ((r, h), (v, wh)) = (hidden.dims2()?, weight.dims2()?);
    if h != wh || targets.dims() != [r] {
        candle_core::bail!(
            "head_target_logprobs: hidden {:?}, weight {:?}, targets {:?}",
            hidden.dims(),
            weight.dims(),
            targets.dims()
        );
    }
    if !fused(hidden) || !fused(weight) {
        return target_logprobs(&hidden.matmul(&weight.t()?)?.to_dtype(DType::F32)?, targets);
    }
    let t = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(bad) = t.iter().find(|&&x| x as usize >= v) {
        candle_core::bail!("target id {bad} outside the vocabulary ({v})");
    }
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, HeadTargetLogprobs { targets: t.into(), chunk })
}

struct HeadTargetLogprobs {
    targets: std::sync::Arc<[u32]>,
    chunk: usize,
}

impl HeadTargetLogprobs {
    /// Runs `f(first row, logits)` for each chunk of rows, the chunk's
    /// logits (rows × V) computed into one reused buffer.
    fn chunks(&self, x: &[f32], w: &[f32], h: usize, v: usize, mut f: impl FnMut(usize, &mut [f32])) {
        let r = x.len() / h.max(1);
        let mut logits = vec![0f32; self.chunk.min(r) * v];
        for first in (0..r).step_by(self.chunk) {
            let n = self.chunk.min(r - first);
            let buf = &mut logits[..n * v];
            // SAFETY: x holds r × h, w holds v × h (row-major), buf n × v.
            unsafe {
                gemm_f32(
                    n,
                    v,
                    h,
                    buf.as_mut_ptr(),
                    (x[first * h..].as_ptr(), h, 1),
                    (w.as_ptr(), 1, h),
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                )
            };
            f(first, buf);
        }
    }
}

impl candle_core::CustomOp2 for HeadTargetLogprobs {
    fn name(&self) -> &'static str {
        "fdpo-head-target-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, h) = (data(s1, l1)?, data(s2, l2)?, last_dim(l1));
        let v = w.len() / h;
        let mut out = vec![0f32; self.targets.len()];
        self.chunks(x, w, h, v, |first, logits| {
            let rows = logits.len() / v;
            out[first..first + rows].par_iter_mut().zip(logits.par_chunks_mut(v)).enumerate().for_each_init(
                || vec![0f32; v],
                |e, (i, (o, row))| {
                    let (max, sum) = exp_shifted(row, e);
                    *o = row[self.targets[first + i] as usize] - (max + sum.ln());
                },
            );
        });
        Ok((CpuStorage::F32(out), Shape::from(self.targets.len())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?.to_vec1::<f32>()?;
        let ((xs, xl), (ws, wl)) = (x.storage_and_layout(), w.storage_and_layout());
        let (xd, wd) = match (&*xs, &*ws) {
            (candle_core::Storage::Cpu(a), candle_core::Storage::Cpu(b)) => (data(a, xl)?, data(b, wl)?),
            _ => candle_core::bail!("head_target_logprobs: CPU tensors only"),
        };
        let (h, v) = (last_dim(xl), wl.dims()[0]);
        let (mut dx, mut dw) = (vec![0f32; xd.len()], vec![0f32; wd.len()]);
        self.chunks(xd, wd, h, v, |first, logits| {
            // dlogits = g·(onehot(target) − softmax), in place.
            let rows = logits.len() / v;
            logits.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
                let gi = g[first + i];
                let max = vmath::max(row);
                row.iter_mut().for_each(|x| *x -= max);
                vmath::exp_in_place(row);
                let scale = -gi / vmath::sum(row);
                row.iter_mut().for_each(|d| *d *= scale);
                row[self.targets[first + i] as usize] += gi;
            });
            let par = gemm::Parallelism::Rayon(rayon::current_num_threads());
            // SAFETY: shapes as stated: logits rows × v, w v × h, x and dx r × h, dw v × h.
            unsafe {
                // dx[rows] (rows × h) = dlogits (rows × v) · w (v × h)
                gemm_f32(
                    rows,
                    h,
                    v,
                    dx[first * h..].as_mut_ptr(),
                    (logits.as_ptr(), v, 1),
                    (wd.as_ptr(), h, 1),
                    par,
                );
                // dw (v × h) += dlogitsᵀ (v × rows) · x[rows] (rows × h)
                gemm_into(
                    v,
                    h,
                    rows,
                    (dw.as_mut_ptr(), h),
                    true,
                    (logits.as_ptr(), 1, v),
                    (xd[first * h..].as_ptr(), h, 1),
                    par,
                );
            }
        });
        drop((xs, ws));
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

// ---------------------------------------------------------------- GEMM

/// A matrix operand of [`gemm_f32`]: pointer, row stride, column stride.
pub(crate) type Operand = (*const f32, usize, usize);

/// c (m × n, row-major, contiguous) = a · b with gemm's `parallelism`.
///
/// # Safety
/// The pointers must address matrices of the stated shapes and strides.
pub(crate) unsafe fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    a: Operand,
    b: Operand,
    parallelism: gemm::Parallelism,
) {
    gemm_into(m, n, k, (c, n), false, a, b, parallelism)
}

/// c (m × n, rows `c_rs` apart, columns contiguous) = a · b, or
/// c += a · b when `accumulate`.
///
/// # Safety
/// The pointers must address matrices of the stated shapes and strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    (c, c_rs): (*mut f32, usize),
    accumulate: bool,
    (a, a_rs, a_cs): Operand,
    (b, b_rs, b_cs): Operand,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::linear::{Linear, WeightLayout};
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    /// Uniform values in [lo, hi) from a fixed seed (tests must not depend on luck).
    pub(crate) fn uniform(shape: impl Into<Shape>, lo: f32, hi: f32, seed: u64) -> Tensor {
        let shape = shape.into();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.elem_count()).map(|_| rng.random_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn close(a: &Tensor, b: &Tensor, what: &str) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-5 * scale.max(y.abs()) + 1e-7, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// A (rows, n) input that is not contiguous (a transposed view), odd sizes.
    fn input(rows: usize, n: usize, seed: f32) -> Var {
        let t = uniform((n, rows), -3.0, 3.0, (seed * 100.0) as u64 + (rows * 1000 + n) as u64);
        let t = (t + seed as f64).unwrap().t().unwrap();
        assert!(rows == 1 || n == 1 || !t.is_contiguous());
        Var::from_tensor(&t).unwrap()
    }

    #[test]
    fn fused_ops_match_the_unfused_composition_forward_and_backward() {
        // n ≥ 2: a norm over one element is constant and its gradient pure rounding.
        for (rows, n) in [(1, 2), (7, 13), (37, 65), (130, 3)] {
            let x = input(rows, n, 0.0);
            let b = input(rows, n, 0.5);
            let w = Var::from_tensor(&uniform(n, 0.5, 1.5, 1)).unwrap();
            let weight = uniform((rows, n), -1.0, 1.0, 2);
            // A loss Σ weight·op(x) so that every output element has its own gradient.
            let check = |name: &str, fused: Tensor, slow: Tensor, vars: &[&Var]| {
                close(&fused, &slow, &format!("{name} forward ({rows}x{n})"));
                let gf = (fused * &weight).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = (slow * &weight).unwrap().sum_all().unwrap().backward().unwrap();
                for (i, v) in vars.iter().enumerate() {
                    close(
                        gf.get(v.as_tensor()).unwrap(),
                        gs.get(v.as_tensor()).unwrap(),
                        &format!("{name} gradient {i} ({rows}x{n})"),
                    );
                }
            };
            check(
                "rms_norm",
                rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
                candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap(),
                &[&x, &w],
            );
            let bias = Var::from_tensor(&uniform(n, -0.5, 0.5, 3)).unwrap();
            check(
                "layer_norm",
                layer_norm(x.as_tensor(), w.as_tensor(), bias.as_tensor(), 1e-5).unwrap(),
                candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), bias.as_tensor(), 1e-5)
                    .unwrap(),
                &[&x, &w, &bias],
            );
            check(
                "softmax",
                softmax_last_dim(x.as_tensor()).unwrap(),
                candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap(),
                &[&x],
            );
            check(
                "silu_mul",
                silu_mul(x.as_tensor(), b.as_tensor()).unwrap(),
                (x.as_tensor().silu().unwrap() * b.as_tensor()).unwrap(),
                &[&x, &b],
            );
            // Spread out so that both tails of tanh are exercised.
            let wide = Var::from_tensor(&(x.as_tensor() * 4.0).unwrap()).unwrap();
            check("gelu", gelu(wide.as_tensor()).unwrap(), wide.as_tensor().gelu().unwrap(), &[&wide]);
            // Target log-probs: rows of n logits, one target each.
            let targets = Tensor::from_vec(
                (0..rows as u32).map(|i| (i * 7) % n as u32).collect::<Vec<_>>(),
                rows,
                &Device::Cpu,
            )
            .unwrap();
            let fused = target_logprobs(x.as_tensor(), &targets).unwrap();
            let slow = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1)
                .unwrap()
                .gather(&targets.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            close(&fused, &slow, "target_logprobs forward");
            let wt = uniform(rows, -1.0, 1.0, 4);
            let gf = (fused * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (slow * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            close(gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap(), "target_logprobs gradient");
        }
    }

    /// The chunked LM head + target log-probs equals the product followed
    /// by log-softmax and gather (candle's ops), values and the gradients
    /// of hidden states and weight, with chunks that do not divide the rows
    /// (and one chunk holding them all).
    #[test]
    fn chunked_head_log_probs_match_the_full_logits() {
        let (r, h, v) = (19, 6, 37);
        let x = Var::from_tensor(&uniform((r, h), -2.0, 2.0, 41)).unwrap();
        let w = Var::from_tensor(&uniform((v, h), -1.0, 1.0, 42)).unwrap();
        let targets: Vec<u32> = (0..r as u32).map(|i| (i * 11 + 3) % v as u32).collect();
        let targets = Tensor::from_vec(targets, r, &Device::Cpu).unwrap();
        let logits = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let slow = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let wt = uniform(r, -1.0, 1.0, 43);
        let gs = (&slow * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        for chunk in [4, 7, 19, 128] {
            let fast = head_target_logprobs_in(x.as_tensor(), w.as_tensor(), &targets, chunk).unwrap();
            close(&fast, &slow, &format!("head log-probs, chunk {chunk}"));
            let gf = (&fast * &wt).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("hidden", &x), ("weight", &w)] {
                let (a, b) = (gf.get(var.as_tensor()).unwrap(), gs.get(var.as_tensor()).unwrap());
                close(a, b, &format!("head log-probs d{name}, chunk {chunk}"));
            }
        }
        let bad = Tensor::new(&[v as u32; 19], &Device::Cpu).unwrap();
        assert!(head_target_logprobs(x.as_tensor(), w.as_tensor(), &bad).is_err());
    }

    /// Gradients reduced over rows (norm weights, bias) are bit-identical
    /// from run to run whatever rayon's scheduling: a seed must give one model.
    #[test]
    fn row_reductions_are_deterministic() {
        let (rows, n) = (4099, 48);
        let x = Var::from_tensor(&uniform((rows, n), -2.0, 2.0, 21)).unwrap();
        let w = Var::from_tensor(&uniform(n, 0.5, 1.5, 22)).unwrap();
        let probe = uniform((rows, n), -1.0, 1.0, 23);
        let mixing = uniform((n, n), -1.0, 1.0, 24);
        let grad = || {
            let y = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
            // A linear layer whose bias is w: its gradient is a row sum too.
            let layer = Linear::new(mixing.clone(), Some(w.as_tensor().clone()), WeightLayout::OutIn);
            let y = layer.forward(&y).unwrap();
            let g = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
        };
        let first = grad();
        for _ in 0..20 {
            assert_eq!(grad(), first);
        }
    }

    #[test]
    fn other_dtypes_take_the_unfused_path() {
        let x = uniform((3, 5), -1.0, 1.0, 9).to_dtype(DType::F64).unwrap();
        let y = softmax_last_dim(&x).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let s = y.sum(1).unwrap().to_vec1::<f64>().unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-12));
        let bad = target_logprobs(
            &Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::new(&[0u32, 3], &Device::Cpu).unwrap(),
        );
        assert!(bad.unwrap_err().to_string().contains("target id 3 outside the vocabulary (3)"));
    }
}
