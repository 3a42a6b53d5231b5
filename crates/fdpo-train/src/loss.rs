//! f-DPO losses on tensors: the batched, differentiable form of
//! `fdpo_core::loss` (same stable formulas, same exponent cap), tested
//! element by element against it. Inputs are sequence log-probabilities
//! (batch,) of the chosen and rejected responses under the policy and the
//! reference; ℓ = log π − log π_ref (or log π alone when reference-free).

use candle_core::{Result, Tensor};
use fdpo_core::loss::{LossType, EXPONENT_CAP};
use fdpo_core::Divergence;

/// Loss options (TRL's DPOConfig names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// The f-divergence (paper's α for `Alpha`).
    pub divergence: Divergence,
    /// The loss built on the chosen − rejected difference.
    pub loss_type: LossType,
    /// β > 0.
    pub beta: f64,
    /// ε of `sigmoid` and `robust`, in [0, 0.5).
    pub label_smoothing: f64,
    /// Ignore the reference (ℓ = log π).
    pub reference_free: bool,
}

/// The loss and what is logged about it (each (batch,) unless scalar).
#[derive(Debug)]
pub struct LossOutput {
    /// Mean loss over the batch (scalar).
    pub loss: Tensor,
    /// Per-pair losses.
    pub losses: Tensor,
    /// β·ℓ_w: TRL's `rewards/chosen` (comparable across divergences).
    pub chosen_rewards: Tensor,
    /// β·ℓ_l: `rewards/rejected`.
    pub rejected_rewards: Tensor,
    /// β·f'(u_w), what the loss sees (`f_rewards/chosen`), up to a constant.
    pub chosen_f_rewards: Tensor,
    /// β·f'(u_l) (`f_rewards/rejected`).
    pub rejected_f_rewards: Tensor,
}

/// log σ(x) = −softplus(−x) = min(x, 0) − log(1 + e^{−|x|}), with |x|
/// written max(x, 0) − min(x, 0): its derivative at 0 is then 0 (candle's
/// `abs` gives 1 there), so log σ'(0) = ½, as it must. With `abs` the first
/// step of a run whose policy is its reference (every margin exactly 0)
/// had twice the sigmoid loss's gradient.
pub(crate) fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let (low, high) = (x.minimum(0.0)?, x.maximum(0.0)?);
    let abs = (&high - &low)?;
    low - ((abs.neg()?.exp()? + 1.0)?.log()?)
}

fn capped_exp(x: &Tensor) -> Result<Tensor> {
    x.minimum(EXPONENT_CAP)?.exp()
}

/// β·f'(u) up to an additive constant, from ℓ (what the difference uses).
fn f_prime_of_log(d: Divergence, l: &Tensor) -> Result<Tensor> {
    match d {
        Divergence::ReverseKl => Ok(l.clone()),
        Divergence::JensenShannon => log_sigmoid(l),
        Divergence::ForwardKl => capped_exp(&l.neg()?)?.neg(),
        Divergence::Alpha { alpha } => capped_exp(&(l * -alpha)?)?.neg()? / alpha,
        Divergence::ChiPo => capped_exp(l)? + l,
    }
}

/// The f-DPO loss of a batch of pairs.
pub fn dpo_loss(
    cfg: &LossConfig,
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    reference_chosen: &Tensor,
    reference_rejected: &Tensor,
) -> Result<LossOutput> {
    let (l_w, l_l) = if cfg.reference_free {
        (policy_chosen.clone(), policy_rejected.clone())
    } else {
        ((policy_chosen - reference_chosen)?, (policy_rejected - reference_rejected)?)
    };
    let (f_w, f_l) = (f_prime_of_log(cfg.divergence, &l_w)?, f_prime_of_log(cfg.divergence, &l_l)?);
    let h = (&f_w - &f_l)?;
    let (beta, eps) = (cfg.beta, cfg.label_smoothing);
    let bh = (&h * beta)?;
    let losses = match cfg.loss_type {
        LossType::Sigmoid => ((log_sigmoid(&bh)? * -(1.0 - eps))? - (log_sigmoid(&bh.neg()?)? * eps)?)?,
        LossType::Robust => {
            (((log_sigmoid(&bh)? * -(1.0 - eps))? + (log_sigmoid(&bh.neg()?)? * eps)?)? / (1.0 - 2.0 * eps))?
        }
        LossType::Hinge => (bh.neg()? + 1.0)?.relu()?,
        LossType::Ipo => (h - 1.0 / (2.0 * beta))?.sqr()?,
    };
    Ok(LossOutput {
        loss: losses.mean_all()?,
        chosen_rewards: (l_w.detach() * beta)?,
        rejected_rewards: (l_l.detach() * beta)?,
        chosen_f_rewards: (f_w.detach() * beta)?,
        rejected_f_rewards: (f_l.detach() * beta)?,
        losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use fdpo_core::loss::pair_loss;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn divergences() -> Vec<Divergence> {
        ["rkl", "fkl", "alpha:0.3", "alpha:0.7", "js", "chi-po"].iter().map(|s| s.parse().unwrap()).collect()
    }

    const LOSSES: [LossType; 4] = [LossType::Sigmoid, LossType::Robust, LossType::Hinge, LossType::Ipo];

    fn cfg(divergence: Divergence, loss_type: LossType) -> LossConfig {
        LossConfig { divergence, loss_type, beta: 0.3, label_smoothing: 0.1, reference_free: false }
    }

    fn t(x: &[f64]) -> Tensor {
        Tensor::new(x, &Device::Cpu).unwrap()
    }

    /// d log σ(x)/dx = σ(−x), at 0 (½) and away from it.
    #[test]
    fn log_sigmoid_gradient_is_the_sigmoid_of_minus_x_also_at_zero() {
        let xs: [f64; 7] = [0.0, 1e-7, -1e-7, 0.5, -3.0, 40.0, -40.0];
        let x = Var::new(&xs, &Device::Cpu).unwrap();
        let g = log_sigmoid(x.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
        let got = g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for (x, g) in xs.iter().zip(got) {
            let want = 1.0 / (1.0 + x.exp());
            assert!((g - want).abs() < 1e-12, "x = {x}: {g} vs {want}");
        }
    }

    /// Element by element against fdpo-core's scalar formulas (f64).
    #[test]
    fn tensor_loss_equals_core_scalar_loss() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let n = 64;
        let draw = |rng: &mut ChaCha8Rng| (0..n).map(|_| rng.random_range(-6.0..6.0)).collect::<Vec<f64>>();
        let (pw, pl, rw, rl) = (draw(&mut rng), draw(&mut rng), draw(&mut rng), draw(&mut rng));
        for d in divergences() {
            for loss in LOSSES {
                let c = cfg(d, loss);
                let out = dpo_loss(&c, &t(&pw), &t(&pl), &t(&rw), &t(&rl)).unwrap();
                let got = out.losses.to_vec1::<f64>().unwrap();
                for i in 0..n {
                    let want = pair_loss(d, loss, c.beta, c.label_smoothing, pw[i] - rw[i], pl[i] - rl[i]);
                    assert!(
                        (got[i] - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "{d} {loss} #{i}: {} vs {want}",
                        got[i]
                    );
                }
            }
        }
    }

    /// d loss / d log π against central differences of the core formula.
    #[test]
    fn gradients_match_finite_differences() {
        let (w0, l0) = (0.7, -0.4);
        for d in divergences() {
            for loss in LOSSES {
                let c = cfg(d, loss);
                let pw = Var::new(&[w0], &Device::Cpu).unwrap();
                let pl = Var::new(&[l0], &Device::Cpu).unwrap();
                let zero = t(&[0.0]);
                let out = dpo_loss(&c, pw.as_tensor(), pl.as_tensor(), &zero, &zero).unwrap();
                let grads = out.loss.backward().unwrap();
                let gw = grads.get(pw.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
                let gl = grads.get(pl.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
                let f = |w: f64, l: f64| pair_loss(d, loss, c.beta, c.label_smoothing, w, l);
                let h = 1e-6;
                let fw = (f(w0 + h, l0) - f(w0 - h, l0)) / (2.0 * h);
                let fl = (f(w0, l0 + h) - f(w0, l0 - h)) / (2.0 * h);
                assert!((gw - fw).abs() < 1e-6 * fw.abs().max(1.0), "{d} {loss}: d/dw {gw} vs {fw}");
                assert!((gl - fl).abs() < 1e-6 * fl.abs().max(1.0), "{d} {loss}: d/dl {gl} vs {fl}");
            }
        }
    }

    /// |ℓ| up to 1e4 in f32: loss and gradients finite.
    #[test]
    fn extreme_log_ratios_stay_finite_in_f32() {
        for d in divergences() {
            for loss in LOSSES {
                let c = cfg(d, loss);
                let pw = Var::new(&[1e4f32, -1e4, 1e4, -1e4, 0.0], &Device::Cpu).unwrap();
                let pl = Var::new(&[-1e4f32, 1e4, 1e4, -1e4, 1e4], &Device::Cpu).unwrap();
                let zero = Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap();
                let out = dpo_loss(&c, pw.as_tensor(), pl.as_tensor(), &zero, &zero).unwrap();
                assert!(out.loss.to_vec0::<f32>().unwrap().is_finite(), "{d} {loss}");
                let grads = out.loss.backward().unwrap();
                for v in [&pw, &pl] {
                    let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
                    assert!(g.iter().all(|x| x.is_finite()), "{d} {loss}: {g:?}");
                }
            }
        }
    }

    /// A tabular policy (free logits over 5 responses, same loss code)
    /// trained on the exact expected Bradley–Terry loss — every ordered pair
    /// (i, j) weighted by σ(r_i − r_j) — converges to fdpo-core's π*.
    #[test]
    fn tabular_policy_converges_to_the_exact_optimum() {
        use candle_nn::{AdamW, Optimizer, ParamsAdamW};
        let rewards: [f64; 5] = [0.8, -0.3, 0.2, 1.1, -0.9];
        let ref_probs = [0.3, 0.25, 0.2, 0.15, 0.1];
        let m = rewards.len();
        let beta = 0.5;
        let log_q: Vec<f64> = ref_probs.iter().map(|p: &f64| p.ln()).collect();
        let (mut iw, mut il, mut weight) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..m {
            for j in 0..m {
                if i != j {
                    iw.push(i as u32);
                    il.push(j as u32);
                    weight.push(1.0 / (1.0 + (rewards[j] - rewards[i]).exp()));
                }
            }
        }
        let dev = Device::Cpu;
        let (iw, il) = (Tensor::new(iw.as_slice(), &dev).unwrap(), Tensor::new(il.as_slice(), &dev).unwrap());
        let weight = Tensor::new(weight.as_slice(), &dev).unwrap();
        let ref_logp = Tensor::new(log_q.as_slice(), &dev).unwrap();
        for d in divergences() {
            let logits = Var::new(log_q.as_slice(), &dev).unwrap();
            let mut opt = AdamW::new(
                vec![logits.clone()],
                ParamsAdamW { lr: 0.02, weight_decay: 0.0, ..Default::default() },
            )
            .unwrap();
            let c = LossConfig {
                divergence: d,
                loss_type: LossType::Sigmoid,
                beta,
                label_smoothing: 0.0,
                reference_free: false,
            };
            for _ in 0..4000 {
                let logp = candle_nn::ops::log_softmax(logits.as_tensor(), 0).unwrap();
                let out = dpo_loss(
                    &c,
                    &logp.index_select(&iw, 0).unwrap(),
                    &logp.index_select(&il, 0).unwrap(),
                    &ref_logp.index_select(&iw, 0).unwrap(),
                    &ref_logp.index_select(&il, 0).unwrap(),
                )
                .unwrap();
                let loss = (out.losses * &weight).unwrap().sum_all().unwrap();
                opt.backward_step(&loss).unwrap();
            }
            let pi = candle_nn::ops::softmax(logits.as_tensor(), 0).unwrap().to_vec1::<f64>().unwrap();
            let star = fdpo_core::solve_prompt(d, beta, &log_q, &rewards).unwrap();
            let gap = pi.iter().zip(&star.policy).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(gap < 1e-3, "{d}: max |π − π*| = {gap}: {pi:?} vs {:?}", star.policy);
        }
    }
}
