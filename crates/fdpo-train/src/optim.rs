//! AdamW (torch's `torch.optim.AdamW`, decoupled weight decay) with state
//! that can be saved and restored exactly, which candle-nn's optimiser does
//! not expose — a resumed run must continue bit for bit.
//!
//! Per parameter p with gradient g at step t (1-based), rate η, decay λ:
//! p ← p·(1 − ηλ); m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
//! p ← p − (η / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε).

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Result, Tensor, Var};

/// AdamW hyper-parameters (torch's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One parameter's moments.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    /// Steps taken (t of the bias correction).
    step: u64,
}

impl AdamW {
    /// An optimiser for `vars` (name, variable), moments at zero.
    pub fn new(vars: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let slots = vars
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { config, slots, step: 0 })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The variables, in order.
    pub fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.var.clone()).collect()
    }

    /// One update at rate `lr`; parameters without a gradient are left alone
    /// (their moments too).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let step_size = lr / (1.0 - c.beta1.powi(t));
        let root_bc2 = (1.0 - c.beta2.powi(t)).sqrt();
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else { continue };
            let p = slot.var.as_tensor();
            if p.dtype() == DType::F32 && p.device().is_cpu() && p.is_contiguous() {
                // One pass over the moments, one over the parameter, in place.
                let g = g.to_dtype(DType::F32)?.contiguous()?;
                slot.m.inplace_op2(&g, &Moments { beta: c.beta1, square: false })?;
                slot.v.inplace_op2(&g, &Moments { beta: c.beta2, square: true })?;
                let update = Update { decay: 1.0 - lr * c.weight_decay, step_size, root_bc2, eps: c.eps };
                p.inplace_op3(&slot.m, &slot.v, &update)?;
                continue;
            }
            let g = g.to_dtype(slot.m.dtype())?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = slot.var.as_tensor();
            let decayed = if c.weight_decay > 0.0 { (p * (1.0 - lr * c.weight_decay))? } else { p.clone() };
            let denom = ((slot.v.sqrt()? / root_bc2)? + c.eps)?;
            let update = ((&slot.m / denom)? * step_size)?;
            slot.var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    /// Writes the moments to a safetensors file (`exp_avg.<name>`,
    /// `exp_avg_sq.<name>`, torch's names) atomically; the step count is
    /// the caller's to save (see [`AdamW::load`]).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            tensors.push((format!("exp_avg.{}", s.name), s.m.clone()));
            tensors.push((format!("exp_avg_sq.{}", s.name), s.v.clone()));
        }
        let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(std::io::Error::other)?;
        fdpo_core::write_atomic(path, &bytes)
    }

    /// Restores the moments saved by [`AdamW::save`] and the step count.
    /// Every variable must have both moments with its shape.
    pub fn load(&mut self, path: &Path, steps: u64) -> std::result::Result<(), String> {
        let device = self.slots.first().map(|s| s.var.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let mut saved: HashMap<String, Tensor> =
            candle_core::safetensors::load(path, &device).map_err(|e| format!("{}: {e}", path.display()))?;
        for s in &mut self.slots {
            for (prefix, target) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let t = saved.remove(&key).ok_or_else(|| format!("{}: missing `{key}`", path.display()))?;
                if t.dims() != s.var.dims() {
                    return Err(format!(
                        "{}: `{key}` has shape {:?}, the model's parameter {:?}",
                        path.display(),
                        t.dims(),
                        s.var.dims()
                    ));
                }
                *target = t;
            }
        }
        self.step = steps;
        Ok(())
    }
}

/// The f32 data of a contiguous layout.
fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("AdamW: not contiguous".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

fn data_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    let (start, end) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("AdamW: not contiguous".into()))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("AdamW: f32 expected"),
    }
}

/// m ← βm + (1 − β)g, or with g² (`square`), in place.
struct Moments {
    beta: f64,
    square: bool,
}

impl candle_core::InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "fdpo-adamw-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (m, g) = (data_mut(s1, l1)?, data(s2, l2)?);
        let (b, a) = (self.beta as f32, (1.0 - self.beta) as f32);
        if self.square {
            m.iter_mut().zip(g).for_each(|(m, g)| *m = b * *m + a * g * g);
        } else {
            m.iter_mut().zip(g).for_each(|(m, g)| *m = b * *m + a * g);
        }
        Ok(())
    }
}

/// p ← p·decay − step_size · m / (√v / √(1 − β₂ᵗ) + ε), in place.
struct Update {
    decay: f64,
    step_size: f64,
    root_bc2: f64,
    eps: f64,
}

impl candle_core::InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "fdpo-adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let (p, m, v) = (data_mut(s1, l1)?, data(s2, l2)?, data(s3, l3)?);
        let (decay, step, inv_root, eps) =
            (self.decay as f32, self.step_size as f32, (1.0 / self.root_bc2) as f32, self.eps as f32);
        for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
            *p = *p * decay - step * m / (v.sqrt() * inv_root + eps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Scalar AdamW from the formula in the module comment, in f64.
    fn reference(p0: f64, grads: &[f64], lr: f64, c: AdamWConfig) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * c.weight_decay;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            p -= lr / (1.0 - c.beta1.powi(t)) * m / (v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt() + c.eps);
        }
        p
    }

    /// The in-place f32 kernels against the f64 formula.
    #[test]
    fn f32_kernels_match_the_formula() {
        let c = AdamWConfig { weight_decay: 0.05, ..Default::default() };
        let start = [1.5f32, -0.5, 2.0, 0.25, -3.0];
        let x = Var::new(&start, &Device::Cpu).unwrap();
        let target = Tensor::new(&[0.0f32, 1.0, -1.0, 0.5, 2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(&[("x".to_string(), x.clone())], c).unwrap();
        let mut seen = vec![vec![]; 5];
        for _ in 0..7 {
            let loss = (x.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            for (i, g) in grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap().into_iter().enumerate()
            {
                seen[i].push(g as f64);
            }
            opt.step(&grads, 0.05).unwrap();
        }
        let got = x.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..5 {
            let want = reference(start[i] as f64, &seen[i], 0.05, c);
            assert!((got[i] as f64 - want).abs() < 1e-5, "{i}: {} vs {want}", got[i]);
        }
    }

    #[test]
    fn matches_the_scalar_formula_and_resumes_exactly() {
        let c = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let x = Var::new(&[1.5f64, -0.5, 2.0], &Device::Cpu).unwrap();
        let target = Tensor::new(&[0.0f64, 1.0, -1.0], &Device::Cpu).unwrap();
        let vars = vec![("x".to_string(), x.clone())];
        let mut opt = AdamW::new(&vars, c).unwrap();
        // Loss Σ (x − target)², gradient 2(x − target); record the gradients.
        let mut seen = vec![vec![]; 3];
        let dir = std::env::temp_dir().join(format!("fdpo-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut saved_at_3 = None;
        for step in 0..6 {
            let loss = (x.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            for (i, g) in grads.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap().into_iter().enumerate()
            {
                seen[i].push(g);
            }
            opt.step(&grads, 0.05).unwrap();
            if step == 2 {
                opt.save(&dir.join("opt.safetensors")).unwrap();
                saved_at_3 = Some(x.as_tensor().copy().unwrap());
            }
        }
        let got = x.as_tensor().to_vec1::<f64>().unwrap();
        for i in 0..3 {
            let want = reference([1.5, -0.5, 2.0][i], &seen[i], 0.05, c);
            assert!((got[i] - want).abs() < 1e-12, "{i}: {} vs {want}", got[i]);
        }
        // Restore at step 3 into a fresh optimiser and replay: identical.
        let y = Var::from_tensor(&saved_at_3.unwrap()).unwrap();
        let mut opt2 = AdamW::new(&[("x".to_string(), y.clone())], c).unwrap();
        opt2.load(&dir.join("opt.safetensors"), 3).unwrap();
        for _ in 3..6 {
            let loss = (y.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            opt2.step(&loss.backward().unwrap(), 0.05).unwrap();
        }
        assert_eq!(y.as_tensor().to_vec1::<f64>().unwrap(), got);
        // A state for other shapes is refused by name.
        let z = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let mut opt3 = AdamW::new(&[("x".to_string(), z)], c).unwrap();
        let e = opt3.load(&dir.join("opt.safetensors"), 3).unwrap_err();
        assert!(e.contains("`exp_avg.x` has shape [3]"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
