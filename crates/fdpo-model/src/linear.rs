//! Linear layers (`y = x Wᵀ + b`, W stored (out, in) as in Llama, and
//! GPT-2's Conv1D `y = x W + b`, W stored (in, out)) as one fused op with
//! its own backward, and a kernel of their own for few rows.
//!
//! Decoding with the KV cache multiplies a handful of rows (one per
//! sequence) by every weight matrix. A general GEMM packs the whole weight
//! matrix into its panel layout on every call, which for m = 8 rows costs
//! more than the product itself (measured: 26% of `fdpo bench generate` in
//! gemm's `pack_lhs`). The few-rows kernel reads each weight row once and
//! applies it to all m rows from L1 cache.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// At most this many rows take the few-rows kernel; more go to the GEMM.
pub const FEW_ROWS: usize = 16;

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// (out, in): `y = x Wᵀ` (torch's `nn.Linear`).
    OutIn,
    /// (in, out): `y = x W` (GPT-2's `Conv1D`).
    InOut,
}

/// A linear map with optional bias; W as `layout` says.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    layout: WeightLayout,
}

impl Linear {
    /// A layer from its weight and bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>, layout: WeightLayout) -> Self {
        Linear { weight, bias, layout }
    }

    /// One layer computing `layers`' outputs side by side (their weights
    /// stacked along the output dimension, so one product replaces several
    /// over the same input). Weights (out, in) only; a missing bias among
    /// present ones counts as zeros. Built per forward pass from the
    /// parameters themselves, so gradients reach each layer's weights.
    pub fn stack(layers: &[&Linear]) -> Result<Linear> {
        if layers.is_empty() || layers.iter().any(|l| l.layout != WeightLayout::OutIn) {
            candle_core::bail!("Linear::stack: needs (out, in) weights");
        }
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let bias = if layers.iter().any(|l| l.bias.is_some()) {
            let biases = layers
                .iter()
                .map(|l| match &l.bias {
                    Some(b) => Ok(b.clone()),
                    None => Tensor::zeros(l.weight.dim(0)?, l.weight.dtype(), l.weight.device()),
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Linear { weight: Tensor::cat(&weights, 0)?, bias, layout: WeightLayout::OutIn })
    }

    /// The weight as (out, in), when the layer is a plain product with it
    /// (no bias): what a fused head + loss reads.
    pub fn out_in_weight(&self) -> Option<&Tensor> {
        (matches!(self.layout, WeightLayout::OutIn) && self.bias.is_none()).then_some(&self.weight)
    }

    /// x (…, in) → (…, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            None => matmul(x, &self.weight, self.layout),
            Some(b) => matmul_add(x, &self.weight, self.layout, b, Addend::Bias),
        }
    }

    /// `residual` + the layer's output, as one node where the layer has no
    /// bias (the residual connection after a projection).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.bias {
            None => matmul_add(x, &self.weight, self.layout, residual, Addend::Residual),
            Some(_) => residual + self.forward(x)?,
        }
    }
}

/// What [`matmul_add`] adds to the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addend {
    /// A bias (n,), added to every row.
    Bias,
    /// A tensor of the output's shape.
    Residual,
}

/// x · W (as [`matmul`]) + `c`, one node: the output starts as `c` (the
/// bias in every row, or a copy of the residual) and the GEMM accumulates
/// into it. Backward adds dc (Σ of the rows of dY for a bias, dY for a
/// residual) to the two products. Anything but f32 on the CPU: candle's ops.
fn matmul_add(x: &Tensor, w: &Tensor, layout: WeightLayout, c: &Tensor, addend: Addend) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let plain_bias = addend == Addend::Residual || c.rank() == 1;
    if !(cpu_f32(x) && cpu_f32(w) && cpu_f32(c) && plain_bias) || x.dim(D::Minus1)? == 0 {
        return matmul(x, w, layout)?.broadcast_add(c);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &c.contiguous()?, LinearAddOp(layout, addend))
}

struct LinearAddOp(WeightLayout, Addend);

impl candle_core::CustomOp3 for LinearAddOp {
    fn name(&self) -> &'static str {
        "fdpo-linear-add"
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
        let op = LinearOp(self.0);
        let (m, k, n) = op.sizes(l1, l2)?;
        let (x, w, c) =
            (crate::fused::data(s1, l1)?, crate::fused::data(s2, l2)?, crate::fused::data(s3, l3)?);
        let dims = output_dims(l1, n);
        let start = match self.1 {
            Addend::Bias if l3.dims() == [n] => c.repeat(m),
            Addend::Residual if l3.dims() == dims.as_slice() => c.to_vec(),
            _ => candle_core::bail!("linear: {:?} {:?} for an output {dims:?}", self.1, l3.dims()),
        };
        let y = op.product(x, w, (m, k, n), Some(start));
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _c: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dx, dw) = linear_grads(self.0, x, w, &g)?;
        let dc = match self.1 {
            Addend::Bias => crate::fused::row_sum(&g)?,
            Addend::Residual => g,
        };
        Ok((Some(dx), Some(dw), Some(dc)))
    }
}

/// x (…, k) times W in `layout` → (…, n): one autograd node. f32 on the
/// CPU runs [`FEW_ROWS`] rows or fewer in the few-rows kernel and more in
/// the GEMM, with a backward pass of two GEMMs; anything else is candle's
/// reshape + matmul.
///
/// As one node, a layer costs autograd one gradient buffer per input. The
/// same product from candle ops (reshape, transpose of W, matmul, reshape
/// back) is four nodes, and candle's backward allocates a zeroed buffer and
/// adds into it for every one of them.
pub fn matmul(x: &Tensor, w: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if !(cpu_f32(x) && cpu_f32(w)) {
        let mut dims = x.dims().to_vec();
        let k = dims.pop().unwrap_or(1);
        let x2 = x.reshape((dims.iter().product::<usize>(), k))?;
        let y = match layout {
            WeightLayout::OutIn => x2.matmul(&w.t()?)?,
            WeightLayout::InOut => x2.matmul(w)?,
        };
        dims.push(y.dim(1)?);
        return y.reshape(dims);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearOp(layout))
}

struct LinearOp(WeightLayout);

impl LinearOp {
    /// (m, k, n) of x (…, k) and the weight, checked.
    fn sizes(&self, x: &Layout, w: &Layout) -> Result<(usize, usize, usize)> {
        let k = x.dims().last().copied().unwrap_or(1);
        let m = x.shape().elem_count() / k.max(1);
        let (wk, n) = match self.0 {
            WeightLayout::OutIn => {
                let (n, k) = w.shape().dims2()?;
                (k, n)
            }
            WeightLayout::InOut => w.shape().dims2()?,
        };
        if wk != k {
            candle_core::bail!("linear: the input has {k} features, the weight {wk} ({:?})", w.dims());
        }
        Ok((m, k, n))
    }

    /// y (m × n) = `start` + x · W (`start` zeros when None): the few-rows
    /// kernel for [`FEW_ROWS`] rows or fewer, the GEMM accumulating into
    /// `start` for more.
    fn product(
        &self,
        x: &[f32],
        w: &[f32],
        (m, k, n): (usize, usize, usize),
        start: Option<Vec<f32>>,
    ) -> Vec<f32> {
        if m <= FEW_ROWS {
            let mut y = few_rows(self.0, x, w, (m, k, n));
            if let Some(start) = start {
                y.iter_mut().zip(&start).for_each(|(y, s)| *y += s);
            }
            return y;
        }
        let (mut y, accumulate) = match start {
            Some(start) => (start, true),
            None => (vec![0f32; m * n], false),
        };
        // SAFETY: x is m × k, the right operand k × n, y m × n.
        unsafe {
            crate::fused::gemm_into(
                m,
                n,
                k,
                (y.as_mut_ptr(), n),
                accumulate,
                (x.as_ptr(), k, 1),
                self.right(w, k, n),
                parallelism(m, n, k),
            )
        };
        y
    }

    /// W read as the (k × n) right operand of y = x · B.
    fn right(&self, w: &[f32], k: usize, n: usize) -> crate::fused::Operand {
        match self.0 {
            WeightLayout::OutIn => (w.as_ptr(), 1, k),
            WeightLayout::InOut => (w.as_ptr(), n, 1),
        }
    }
}

/// The output dims of x (…, k) times a weight with n outputs: (…, n).
fn output_dims(x: &Layout, n: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    dims.pop();
    dims.push(n);
    dims
}

/// gemm's threading for an m × n × k product (candle's rule: threads from
/// rayon's pool, none for small products).
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k < 4096 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    }
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "fdpo-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = self.sizes(l1, l2)?;
        let (x, w) = (crate::fused::data(s1, l1)?, crate::fused::data(s2, l2)?);
        let dims = output_dims(l1, n);
        let y = self.product(x, w, (m, k, n), None);
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = linear_grads(self.0, x, w, &g.contiguous()?)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx and dW of x · W from dY (contiguous).
fn linear_grads(layout: WeightLayout, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let grads = x.apply_op3_no_bwd(w, g, &LinearBackward(layout))?;
    let nx = x.elem_count();
    let dx = grads.narrow(0, 0, nx)?.reshape(x.shape())?;
    let dw = grads.narrow(0, nx, w.elem_count())?.reshape(w.shape())?;
    Ok((dx, dw))
}

/// [dx | dW] from x, W and dY: y = x Wᵀ gives dx = dY W, dW = dYᵀ x;
/// y = x W gives dx = dY Wᵀ, dW = xᵀ dY.
struct LinearBackward(WeightLayout);

impl candle_core::CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "fdpo-linear-backward"
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
        let (m, k, n) = LinearOp(self.0).sizes(l1, l2)?;
        let (x, w, g) =
            (crate::fused::data(s1, l1)?, crate::fused::data(s2, l2)?, crate::fused::data(s3, l3)?);
        let mut out = vec![0f32; m * k + n * k];
        let (dx, dw) = out.split_at_mut(m * k);
        let (xp, gp) = (x.as_ptr(), g.as_ptr());
        // B = W read as the forward's right operand (k × n); dx = dY Bᵀ.
        let (b, b_rs, b_cs) = LinearOp(self.0).right(w, k, n);
        // SAFETY: x is m × k, B k × n, dY m × n; dx is m × k and dW has W's
        // shape, both row-major.
        unsafe {
            crate::fused::gemm_f32(
                m,
                k,
                n,
                dx.as_mut_ptr(),
                (gp, n, 1),
                (b, b_cs, b_rs),
                parallelism(m, k, n),
            );
            match self.0 {
                // dW (n × k) = dYᵀ x
                WeightLayout::OutIn => crate::fused::gemm_f32(
                    n,
                    k,
                    m,
                    dw.as_mut_ptr(),
                    (gp, 1, n),
                    (xp, k, 1),
                    parallelism(n, k, m),
                ),
                // dW (k × n) = xᵀ dY
                WeightLayout::InOut => crate::fused::gemm_f32(
                    k,
                    n,
                    m,
                    dw.as_mut_ptr(),
                    (xp, 1, k),
                    (gp, n, 1),
                    parallelism(k, n, m),
                ),
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(m * k + n * k)))
    }
}

/// y (m × n) for few rows: each weight row read once, applied to all m rows.
fn few_rows(layout: WeightLayout, x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    // Each task fills a block of columns of yᵀ (n × m), then yᵀ → y.
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(COLUMNS_PER_TASK * m.max(1)).enumerate().for_each(|(c, out)| {
        let j0 = c * COLUMNS_PER_TASK;
        let cols = out.len() / m.max(1);
        match layout {
            WeightLayout::OutIn => dispatch::dots(x, &w[j0 * k..(j0 + cols) * k], m, k, out),
            WeightLayout::InOut => dispatch::axpys(x, w, m, k, n, j0, out),
        }
    });
    let mut y = vec![0f32; m * n];
    for (j, col) in yt.chunks(m.max(1)).enumerate() {
        for (i, v) in col.iter().enumerate() {
            y[i * n + j] = *v;
        }
    }
    y
}

/// Output columns per rayon task of the few-rows kernel.
const COLUMNS_PER_TASK: usize = 64;

/// The kernels, compiled twice: for AVX2 (chosen at run time where the CPU
/// has it) and for the baseline target.
mod dispatch {
    /// `out[j·m + i] = x_i · w_j` for the rows w_j of `w` (each k long).
    pub fn dots(x: &[f32], w: &[f32], m: usize, k: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { dots_avx2(x, w, m, k, out) };
        }
        dots_body(x, w, m, k, out)
    }

    /// `out[jj·m + i] = Σ_l x[i, l] · w[l, j0 + jj]` for w (k × n), a block
    /// of out.len()/m columns from j0.
    pub fn axpys(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, j0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { axpys_avx2(x, w, m, k, n, j0, out) };
        }
        axpys_body(x, w, m, k, n, j0, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn dots_avx2(x: &[f32], w: &[f32], m: usize, k: usize, out: &mut [f32]) {
        dots_body(x, w, m, k, out)
    }

    /// [`axpys_body`] with blocks of 4 rows × 16 columns in AVX registers
    /// (8 FMA accumulators); the columns past the last full block in scalar
    /// code. The block's 16 columns of w are first copied into a contiguous
    /// k × 16 panel: read in place, each row of w costs a cache line and a
    /// TLB entry of its own, and the loads stalled the loop.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpys_avx2(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, j0: usize, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let cols = out.len() / m;
        let full = cols / 16 * 16;
        assert!(k == 0 || (x.len() >= m * k && w.len() >= (k - 1) * n + j0 + cols));
        for jb in (0..full).step_by(16) {
            for i0 in (0..m).step_by(4) {
                let rows = (m - i0).min(4);
                let mut acc = [_mm256_setzero_ps(); 8];
                for l in 0..k {
                    let wp = w.as_ptr().add(l * n + j0 + jb);
                    let (w0, w1) = (_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8)));
                    for r in 0..4 {
                        // Rows past m repeat the last one; their sums are not written.
                        let xr = _mm256_set1_ps(*x.get_unchecked((i0 + r.min(rows - 1)) * k + l));
                        acc[2 * r] = _mm256_fmadd_ps(xr, w0, acc[2 * r]);
                        acc[2 * r + 1] = _mm256_fmadd_ps(xr, w1, acc[2 * r + 1]);
                    }
                }
                let mut sums = [0f32; 16];
                for r in 0..rows {
                    _mm256_storeu_ps(sums.as_mut_ptr(), acc[2 * r]);
                    _mm256_storeu_ps(sums.as_mut_ptr().add(8), acc[2 * r + 1]);
                    for (c, v) in sums.iter().enumerate() {
                        out[(jb + c) * m + i0 + r] = *v;
                    }
                }
            }
        }
        axpys_columns(x, w, m, k, n, j0, full, out);
    }

    /// Lanes of the partial sums: independent, so the compiler vectorises them.
    const LANES: usize = 16;

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
        for (a, b) in ac.zip(bc) {
            for l in 0..LANES {
                acc[l] += a[l] * b[l];
            }
        }
        acc.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    fn dots_body(x: &[f32], w: &[f32], m: usize, k: usize, out: &mut [f32]) {
        for (wj, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
            for (i, o) in o.iter_mut().enumerate() {
                *o = dot(&x[i * k..][..k], wj);
            }
        }
    }

    /// `out[jj·m + i] = Σ_l x[i, l] · w[l, j0 + jj]` for w (k × n), a block
    /// of out.len()/m columns from j0 (the portable version).
    #[inline(always)]
    fn axpys_body(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, j0: usize, out: &mut [f32]) {
        axpys_columns(x, w, m, k, n, j0, 0, out)
    }

    /// The columns from `first` on of [`axpys_body`], one at a time.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn axpys_columns(
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        n: usize,
        j0: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let cols = out.len() / m;
        let mut acc = vec![0f32; m];
        for jj in first..cols {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for l in 0..k {
                let wl = w[l * n + j0 + jj];
                for (i, a) in acc.iter_mut().enumerate() {
                    *a += x[i * k + l] * wl;
                }
            }
            out[jj * m..][..m].copy_from_slice(&acc);
        }
    }

    /// The portable kernels (what CPUs without AVX2 run) give the AVX2 ones' values.
    #[test]
    fn portable_kernels_match_the_dispatched_ones() {
        let (m, k, n, j0, cols) = (5, 33, 70, 3, 53);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
        let (mut a, mut b) = (vec![0f32; cols * m], vec![0f32; cols * m]);
        axpys(&x, &w, m, k, n, j0, &mut a);
        axpys_body(&x, &w, m, k, n, j0, &mut b);
        assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-5), "axpys");
        dots(&x, &w[..cols * k], m, k, &mut a);
        dots_body(&x, &w[..cols * k], m, k, &mut b);
        assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-5), "dots");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};

    fn uniform(shape: impl Into<Shape>, seed: u64) -> Tensor {
        let shape = shape.into();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.elem_count()).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        diff / scale
    }

    /// Both layouts, odd sizes (k and n not multiples of the lanes or of
    /// the task width), 1..=FEW_ROWS rows (the few-rows kernel) and more
    /// (the GEMM), 2-D and 3-D inputs, a transposed (non-contiguous) input:
    /// values and both gradients equal candle's reshape + matmul.
    #[test]
    fn linear_matches_candles_matmul_forward_and_backward() {
        for (lead, k, n) in [
            (vec![1], 5, 3),
            (vec![3], 37, 130),
            (vec![2, 4], 64, 257),
            (vec![FEW_ROWS], 100, 65),
            (vec![3, 7], 33, 20),
            (vec![40], 16, 48),
        ] {
            let m: usize = lead.iter().product();
            for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
                let wshape = match layout {
                    WeightLayout::OutIn => (n, k),
                    WeightLayout::InOut => (k, n),
                };
                let x = Var::from_tensor(&uniform((k, m), 1).t().unwrap()).unwrap();
                let mut xdims = lead.clone();
                xdims.push(k);
                let x_in = x.reshape(xdims).unwrap();
                let w = Var::from_tensor(&uniform(wshape, 2)).unwrap();
                let probe = uniform((m, n), 3);
                let fast = matmul(&x_in, w.as_tensor(), layout).unwrap();
                let mut ydims = lead.clone();
                ydims.push(n);
                assert_eq!(fast.dims(), ydims.as_slice());
                let fast = fast.reshape((m, n)).unwrap();
                let slow = match layout {
                    WeightLayout::OutIn => x.matmul(&w.t().unwrap()).unwrap(),
                    WeightLayout::InOut => x.matmul(&w).unwrap(),
                };
                assert!(max_rel(&fast, &slow) < 1e-5, "{layout:?} {m}x{k}x{n}");
                let gf = (fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gs = (slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                for v in [&x, &w] {
                    let (a, b) = (gf.get(v).unwrap(), gs.get(v).unwrap());
                    assert!(max_rel(a, b) < 1e-5, "{layout:?} {m}x{k}x{n} gradient");
                }
            }
        }
    }

    /// A bias or a residual added inside the product: values and the
    /// gradients of x, W and the addend equal candle's matmul + add, for few
    /// rows and many, both layouts.
    #[test]
    fn linear_with_bias_or_residual_matches_candles_matmul_and_add() {
        for (m, k, n) in [(1, 5, 3), (FEW_ROWS, 37, 130), (40, 64, 33)] {
            for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
                let wshape = if layout == WeightLayout::OutIn { (n, k) } else { (k, n) };
                // x and the residual as transposed (non-contiguous) views.
                let x = Var::from_tensor(&uniform((2, k, m), 7).transpose(1, 2).unwrap()).unwrap();
                let w = Var::from_tensor(&uniform(wshape, 8)).unwrap();
                let bias = Var::from_tensor(&uniform(n, 9)).unwrap();
                let residual = Var::from_tensor(&uniform((2, n, m), 10).transpose(1, 2).unwrap()).unwrap();
                let probe = uniform((2, m, n), 11);
                let plain = |x: &Tensor| {
                    let x2 = x.reshape((2 * m, k)).unwrap();
                    let y = match layout {
                        WeightLayout::OutIn => x2.matmul(&w.t().unwrap()).unwrap(),
                        WeightLayout::InOut => x2.matmul(&w).unwrap(),
                    };
                    y.reshape((2, m, n)).unwrap()
                };
                let with_bias = Linear::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()), layout);
                let without = Linear::new(w.as_tensor().clone(), None, layout);
                let cases = [
                    ("bias", with_bias.forward(&x).unwrap(), plain(&x).broadcast_add(&bias).unwrap(), &bias),
                    (
                        "residual",
                        without.forward_residual(&x, &residual).unwrap(),
                        (plain(&x) + residual.as_tensor()).unwrap(),
                        &residual,
                    ),
                ];
                for (what, fast, slow, addend) in cases {
                    assert!(max_rel(&fast, &slow) < 1e-5, "{what} {layout:?} {m}x{k}x{n}");
                    let gf = (fast * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    let gs = (slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                    for v in [&x, &w, addend] {
                        let (a, b) = (gf.get(v).unwrap(), gs.get(v).unwrap());
                        assert!(max_rel(a, b) < 1e-5, "{what} {layout:?} {m}x{k}x{n} gradient");
                    }
                }
            }
        }
    }

    /// An addend with the right number of elements but the wrong shape is
    /// an error naming it, not a silent reinterpretation.
    #[test]
    fn a_misshapen_residual_is_an_error() {
        let layer = Linear::new(uniform((6, 4), 12), None, WeightLayout::OutIn);
        let x = uniform((2, 20, 4), 13);
        let err = layer.forward_residual(&x, &uniform((40, 6), 14)).unwrap_err().to_string();
        assert!(err.contains("Residual [40, 6] for an output [2, 20, 6]"), "{err}");
    }

    /// The layer routes few rows to the kernel and many to the GEMM with the same result.
    #[test]
    fn linear_gives_the_same_values_for_few_and_many_rows() {
        let (k, n) = (48, 40);
        let layer = Linear::new(uniform((n, k), 4), Some(uniform(n, 5)), WeightLayout::OutIn);
        let x = uniform((4, 10, k), 6);
        let all = layer.forward(&x).unwrap();
        let one = layer.forward(&x.narrow(1, 3, 1).unwrap()).unwrap();
        assert_eq!(one.dims(), [4, 1, n]);
        assert!(max_rel(&one, &all.narrow(1, 3, 1).unwrap()) < 1e-5);
    }
}
