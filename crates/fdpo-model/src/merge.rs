//! Merging Hugging Face checkpoints of one architecture into a new one
//! (`fdpo merge`), tensor by tensor, in f32:
//!
//! - `linear`: Σ wᵢθᵢ with the weights normalised to sum 1 (a model soup);
//! - `slerp`: spherical interpolation of two models at t ∈ [0, 1], per
//!   tensor: θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁ with
//!   cos Ω = ⟨θ₀, θ₁⟩/(‖θ₀‖‖θ₁‖), linear where the two are (anti)parallel;
//! - `task-arithmetic`: θ_base + Σ wᵢ(θᵢ − θ_base) (Ilharco et al. 2023);
//! - `ties`: TIES-merging (Yadav et al. 2023) on the task vectors
//!   τᵢ = wᵢ(θᵢ − θ_base): trim each to its `density` share of largest
//!   magnitudes, elect a sign per parameter (the sign of Σᵢ τᵢ), and add to
//!   θ_base the mean of the trimmed τᵢ that agree with it.
//!
//! Every model must have the base's `model_type`, tensor names and shapes;
//! a difference is an error naming the file and the tensor. The output
//! takes the base's (or first model's) config.json and tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{ModelError, Weights};

/// How to merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MergeMethod {
    /// Weighted average (weights normalised to sum 1).
    Linear,
    /// Spherical interpolation of two models at `t`.
    Slerp {
        /// 0 gives the first model, 1 the second.
        t: f64,
    },
    /// θ_base + Σ wᵢ(θᵢ − θ_base).
    TaskArithmetic,
    /// Trim, elect sign, disjoint mean (Yadav et al. 2023).
    Ties {
        /// Share of each task vector's entries kept, by magnitude, in (0, 1].
        density: f64,
    },
}

impl MergeMethod {
    /// Whether the method merges differences from a base model.
    pub fn needs_base(&self) -> bool {
        matches!(self, MergeMethod::TaskArithmetic | MergeMethod::Ties { .. })
    }
}

/// One tensor of the merged model from the same tensor of every model
/// (flattened), the base's when the method needs one.
pub fn merge_values(
    method: MergeMethod,
    base: Option<&[f32]>,
    models: &[&[f32]],
    weights: &[f64],
) -> Vec<f32> {
    let n = models[0].len();
    match method {
        MergeMethod::Linear => {
            let total: f64 = weights.iter().sum();
            (0..n)
                .map(|j| models.iter().zip(weights).map(|(m, w)| w / total * m[j] as f64).sum::<f64>() as f32)
                .collect()
        }
        MergeMethod::Slerp { t } => slerp(models[0], models[1], t),
        MergeMethod::TaskArithmetic => {
            let base = base.expect("task arithmetic has a base (checked by merge_checkpoints)");
            (0..n)
                .map(|j| {
                    let b = base[j] as f64;
                    (b + models.iter().zip(weights).map(|(m, w)| w * (m[j] as f64 - b)).sum::<f64>()) as f32
                })
                .collect()
        }
        MergeMethod::Ties { density } => {
            let base = base.expect("TIES has a base (checked by merge_checkpoints)");
            let tasks: Vec<Vec<f64>> = models
                .iter()
                .zip(weights)
                .map(|(m, w)| {
                    trim(&(0..n).map(|j| w * (m[j] as f64 - base[j] as f64)).collect::<Vec<_>>(), density)
                })
                .collect();
            (0..n)
                .map(|j| {
                    // The elected sign; a zero sum elects nothing.
                    let sum = tasks.iter().map(|t| t[j]).sum::<f64>();
                    let sign = if sum == 0.0 { 0.0 } else { sum.signum() };
                    let agree: Vec<f64> =
                        tasks.iter().map(|t| t[j]).filter(|&x| x != 0.0 && x.signum() == sign).collect();
                    let merged =
                        if agree.is_empty() { 0.0 } else { agree.iter().sum::<f64>() / agree.len() as f64 };
                    (base[j] as f64 + merged) as f32
                })
                .collect()
        }
    }
}

/// `task` with all but its `density` share of largest magnitudes set to 0
/// (ties at the threshold kept).
fn trim(task: &[f64], density: f64) -> Vec<f64> {
    let keep = ((task.len() as f64 * density).round() as usize).clamp(1, task.len().max(1));
    let mut magnitudes: Vec<f64> = task.iter().map(|x| x.abs()).collect();
    magnitudes.sort_by(|a, b| b.total_cmp(a));
    let threshold = magnitudes.get(keep - 1).copied().unwrap_or(0.0);
    task.iter().map(|&x| if x.abs() >= threshold { x } else { 0.0 }).collect()
}

/// Spherical interpolation of two flattened tensors.
fn slerp(a: &[f32], b: &[f32], t: f64) -> Vec<f32> {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let (na, nb) = (norm(a), norm(b));
    let cos = if na > 0.0 && nb > 0.0 { (dot / (na * nb)).clamp(-1.0, 1.0) } else { 1.0 };
    let (ca, cb) = if cos.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let omega = cos.acos();
        (((1.0 - t) * omega).sin() / omega.sin(), (t * omega).sin() / omega.sin())
    };
    a.iter().zip(b).map(|(x, y)| (ca * *x as f64 + cb * *y as f64) as f32).collect()
}

/// `model_type` of a checkpoint's config.json.
fn model_type(dir: &Path) -> Result<String, ModelError> {
    let path = dir.join("config.json");
    let value = crate::read_json(&path)?;
    value.get("model_type").and_then(|v| v.as_str()).map(String::from).ok_or_else(|| ModelError::Config {
        path,
        field: "model_type".into(),
        message: "missing".into(),
    })
}

/// Merges the checkpoints `models` (with `weights`, one per model) by
/// `method` into `out`, a Hugging Face model directory with the
/// metadata of `base` (or of the first model).
pub fn merge_checkpoints(
    method: MergeMethod,
    models: &[PathBuf],
    weights: &[f64],
    base: Option<&Path>,
    out: &Path,
) -> Result<(), ModelError> {
    let fail = |message: String| ModelError::Config { path: out.into(), field: "merge".into(), message };
    if models.is_empty() || weights.len() != models.len() {
        return Err(fail(format!(
            "{} models and {} weights: give one weight per model",
            models.len(),
            weights.len()
        )));
    }
    if matches!(method, MergeMethod::Slerp { .. }) && models.len() != 2 {
        return Err(fail(format!("slerp merges exactly two models, got {}", models.len())));
    }
    if method.needs_base() && base.is_none() {
        return Err(fail("task-arithmetic and ties merge differences from a base model: give one".into()));
    }
    let source = base.unwrap_or(&models[0]);
    let kind = model_type(source)?;
    for dir in models {
        let other = model_type(dir)?;
        if other != kind {
            return Err(ModelError::Config {
                path: dir.join("config.json"),
                field: "model_type".into(),
                message: format!(
                    "`{other}`, but {} is `{kind}`: merge models of one architecture",
                    source.display()
                ),
            });
        }
    }
    let load = |dir: &Path| -> Result<HashMap<String, Tensor>, ModelError> {
        Weights::load_dir(dir, DType::F32, &Device::Cpu)?.current()
    };
    let reference = load(source)?;
    let loaded: Vec<HashMap<String, Tensor>> = models.iter().map(|d| load(d)).collect::<Result<_, _>>()?;
    let base_tensors = if method.needs_base() { Some(&reference) } else { None };
    let mut merged = HashMap::with_capacity(reference.len());
    for (name, like) in &reference {
        let mut values = Vec::with_capacity(models.len());
        for (dir, tensors) in models.iter().zip(&loaded) {
            let t = tensors.get(name).ok_or_else(|| ModelError::Checkpoint {
                path: dir.clone(),
                message: format!("tensor `{name}` is missing (it is in {})", source.display()),
            })?;
            if t.dims() != like.dims() {
                return Err(ModelError::Checkpoint {
                    path: dir.clone(),
                    message: format!(
                        "tensor `{name}`: shape {:?}, but {:?} in {}",
                        t.dims(),
                        like.dims(),
                        source.display()
                    ),
                });
            }
            values.push(t.flatten_all()?.to_vec1::<f32>()?);
        }
        for (dir, tensors) in models.iter().zip(&loaded) {
            if let Some(extra) = tensors.keys().find(|k| !reference.contains_key(*k)) {
                return Err(ModelError::Checkpoint {
                    path: dir.clone(),
                    message: format!("tensor `{extra}` is not in {}", source.display()),
                });
            }
        }
        let base_values = base_tensors.map(|b| b[name].flatten_all()?.to_vec1::<f32>()).transpose()?;
        let slices: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        let out_values = merge_values(method, base_values.as_deref(), &slices, weights);
        merged.insert(name.clone(), Tensor::from_vec(out_values, like.dims(), &Device::Cpu)?);
    }
    crate::save::save_pretrained(&Weights::from_tensors(out, merged), source, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_of_identical_models_is_the_model_and_task_arithmetic_at_zero_is_the_base() {
        let m = [0.5f32, -1.25, 3.0];
        assert_eq!(merge_values(MergeMethod::Linear, None, &[&m, &m, &m], &[0.2, 0.5, 0.3]), m);
        // Unnormalised weights are normalised: 1:3 is 0.25/0.75.
        let got = merge_values(MergeMethod::Linear, None, &[&[0.0f32, 4.0], &[4.0, 0.0]], &[1.0, 3.0]);
        assert_eq!(got, [3.0, 1.0]);
        let base = [1.0f32, 2.0, 3.0];
        assert_eq!(merge_values(MergeMethod::TaskArithmetic, Some(&base), &[&m], &[0.0]), base);
        let got = merge_values(MergeMethod::TaskArithmetic, Some(&base), &[&m], &[0.5]);
        assert_eq!(got, [0.75, 0.375, 3.0]);
    }

    /// SLERP at 0 and 1 returns the endpoints; at 0.5 between two vectors
    /// of one norm it keeps that norm (a linear average would shrink it)
    /// and bisects the angle.
    #[test]
    fn slerp_returns_endpoints_and_preserves_norms() {
        let a = [3.0f32, 0.0, 4.0];
        let b = [0.0f32, 5.0, 0.0];
        let at = |t: f64| merge_values(MergeMethod::Slerp { t }, None, &[&a, &b], &[1.0, 1.0]);
        for (x, y) in at(0.0).iter().zip(a) {
            assert!((x - y).abs() < 1e-6);
        }
        for (x, y) in at(1.0).iter().zip(b) {
            assert!((x - y).abs() < 1e-6);
        }
        let mid = at(0.5);
        let norm = mid.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 5.0).abs() < 1e-5, "norm {norm}");
        let cos = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(x, y)| x * y).sum::<f32>() / 25.0;
        assert!((cos(&mid, &a) - cos(&mid, &b)).abs() < 1e-6 && (cos(&mid, &a) - 0.5f32.sqrt()).abs() < 1e-5);
        let linear = merge_values(MergeMethod::Linear, None, &[&a, &b], &[1.0, 1.0]);
        assert!(linear.iter().map(|x| x * x).sum::<f32>().sqrt() < 4.0);
    }

    /// Three task vectors over 5 parameters, worked by hand (density 0.6:
    /// 3 of 5 entries kept per vector).
    ///
    /// τ₁ = [ 0.5, −0.1,  0.3,  0.0, −0.8] → trimmed [ 0.5, 0,  0.3, 0, −0.8]
    /// τ₂ = [−0.4,  0.2,  0.6, −0.1, −0.15] → trimmed [−0.4, 0.2, 0.6, 0, 0]
    /// τ₃ = [ 0.2,  0.7, −1.2,  0.05, 0.1] → trimmed [ 0.2, 0.7, −1.2, 0, 0]
    /// sums 0.3, 0.9, −0.3, 0, −0.8 → signs +, +, −, none, −
    /// agreeing means: (0.5+0.2)/2 = 0.35, (0.2+0.7)/2 = 0.45, −1.2, 0, −0.8.
    #[test]
    fn ties_matches_a_hand_worked_example() {
        let base = [1.0f32, 1.0, 1.0, 1.0, 1.0];
        let plus = |t: [f32; 5]| -> Vec<f32> { t.iter().zip(base).map(|(x, b)| x + b).collect() };
        let m1 = plus([0.5, -0.1, 0.3, 0.0, -0.8]);
        let m2 = plus([-0.4, 0.2, 0.6, -0.1, -0.15]);
        let m3 = plus([0.2, 0.7, -1.2, 0.05, 0.1]);
        let got = merge_values(MergeMethod::Ties { density: 0.6 }, Some(&base), &[&m1, &m2, &m3], &[1.0; 3]);
        let want = [1.35f32, 1.45, -0.2, 1.0, 0.2];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
