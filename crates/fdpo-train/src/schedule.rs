//! Learning-rate schedules (transformers' `get_scheduler` names and
//! formulas) and gradient clipping by global norm, for the trainers.
//!
//! The rate at optimiser step `step` (0-based) of `total` is `learning_rate`
//! times a factor: linear warmup over `warmup_steps` (step / warmup), then
//! `constant` 1, `linear` decay (total − step)/(total − warmup) to 0, or
//! `cosine` ½(1 + cos(π·progress)) with progress (step − warmup)/(total − warmup).

use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{Result, Var};

/// The decay after warmup (`lr_scheduler_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Constant after warmup (`constant_with_warmup`; `constant` when warmup is 0).
    Constant,
    /// Linear decay to 0.
    Linear,
    /// Half-cosine decay to 0.
    Cosine,
}

impl FromStr for ScheduleKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "constant" | "constant_with_warmup" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            _ => Err(format!(
                "unknown lr_scheduler_type `{s}` (constant, constant_with_warmup, linear, cosine)"
            )),
        }
    }
}

/// A learning-rate schedule over `total` optimiser steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak rate.
    pub learning_rate: f64,
    /// Steps of linear warmup from 0.
    pub warmup_steps: usize,
    /// Optimiser steps in the whole run.
    pub total_steps: usize,
    /// Decay after warmup.
    pub kind: ScheduleKind,
}

impl Schedule {
    /// The rate at 0-based optimiser step `step`.
    ///
    /// ```
    /// use fdpo_train::schedule::{Schedule, ScheduleKind};
    /// let s = Schedule { learning_rate: 1e-3, warmup_steps: 10, total_steps: 110, kind: ScheduleKind::Linear };
    /// assert_eq!(s.rate(5), 5e-4);
    /// assert!((s.rate(60) - 5e-4).abs() < 1e-18);
    /// ```
    pub fn rate(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let factor = if step < self.warmup_steps {
            s / w.max(1.0)
        } else {
            let progress = ((s - w) / (t - w).max(1.0)).clamp(0.0, 1.0);
            match self.kind {
                ScheduleKind::Constant => 1.0,
                ScheduleKind::Linear => 1.0 - progress,
                ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            }
        };
        self.learning_rate * factor
    }
}

/// The global L2 norm of the gradients of `vars` (those without a
/// gradient count as 0).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sum = 0.0;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
    }
    Ok(sum.sqrt())
}

/// Scales every gradient so that the global norm is at most `max_norm`
/// (torch's `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// transformers' formulas at a few points (get_linear_schedule_with_warmup,
    /// get_cosine_schedule_with_warmup with num_cycles 0.5).
    #[test]
    fn schedules_match_transformers_formulas() {
        let mk = |kind| Schedule { learning_rate: 2.0, warmup_steps: 4, total_steps: 20, kind };
        let lin = mk(ScheduleKind::Linear);
        assert_eq!(lin.rate(0), 0.0);
        assert_eq!(lin.rate(2), 1.0);
        assert_eq!(lin.rate(4), 2.0);
        assert!((lin.rate(12) - 2.0 * 8.0 / 16.0).abs() < 1e-15);
        assert_eq!(lin.rate(20), 0.0);
        let cos = mk(ScheduleKind::Cosine);
        assert!((cos.rate(12) - 1.0).abs() < 1e-15); // half way: ½(1 + cos π/2)
        assert!((cos.rate(8) - (1.0 + (std::f64::consts::PI * 0.25).cos())).abs() < 1e-15);
        assert_eq!(mk(ScheduleKind::Constant).rate(19), 2.0);
        assert_eq!("constant_with_warmup".parse::<ScheduleKind>(), Ok(ScheduleKind::Constant));
        assert!("polynomial".parse::<ScheduleKind>().is_err());
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
        let dev = Device::Cpu;
        let a = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let b = Var::new(&[3.0f32], &dev).unwrap();
        // loss = 3·a₀ + 4·b₀ → gradients [3, 0] and [4]: norm 5.
        let coef = Tensor::new(&[3.0f32, 0.0], &dev).unwrap();
        let loss = ((a.as_tensor() * &coef).unwrap().sum_all().unwrap()
            + (b.as_tensor() * 4.0).unwrap().sum_all().unwrap())
        .unwrap();
        let mut grads = loss.backward().unwrap();
        let vars = [a.clone(), b.clone()];
        let before = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((before - 5.0).abs() < 1e-6);
        assert!((grad_norm(&grads, &vars).unwrap() - 1.0).abs() < 1e-5);
        let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-5 && ga[1] == 0.0);
        // Below the limit nothing changes.
        assert!((clip_grad_norm(&mut grads, &vars, 10.0).unwrap() - 1.0).abs() < 1e-5);
        assert!((grad_norm(&grads, &vars).unwrap() - 1.0).abs() < 1e-5);
    }
}
