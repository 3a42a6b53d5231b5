//! The f-divergence family of f-DPO (Wang et al., ICLR 2024, Table 1 / Theorem 1).
//!
//! Each divergence is one [`Divergence`] value; every formula that depends on
//! the choice of f — f, f', f' as a function of ℓ = log u, (f')⁻¹ and its
//! domain, the per-term contribution to D_f — is written here and nowhere
//! else. The exact solver and the tensor losses both ask this type.
//!
//! Conventions (docs/DESIGN.md §1): u = π/π_ref, ℓ = log u, and α follows
//! the paper: α → 0 is reverse KL, α = 1 is forward KL (TRL's coefficient is
//! 1 − α). Only admissible divergences can be constructed: f' must be
//! invertible and 0 must not be in its domain (f'(u) → −∞ as u → 0⁺), so the
//! optimum is strictly positive and the reward is identified. Total variation
//! and Pearson χ² are refused when parsed.
//!
//! Numerics: everything is written in ℓ where it matters, so that
//! u = e^ℓ never has to be formed when it would overflow. For the divergences
//! whose f' is bounded above (forward KL, α, JS) the solver works in the
//! "gap" coordinate g = sup f' − v > 0, which keeps full relative precision
//! when v approaches the supremum (an optimum with u ≫ 1).

use std::f64::consts::LN_2;
use std::fmt;
use std::str::FromStr;

/// An admissible f-divergence, carrying its own parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// f(u) = u log u: KL(π‖π_ref), the divergence of RLHF and DPO.
    ReverseKl,
    /// f(u) = −log u: KL(π_ref‖π).
    ForwardKl,
    /// f(u) = (u^{1−α} − (1−α)u − α)/(α(α−1)), 0 < α < 1 (paper's α).
    Alpha {
        /// The paper's α, strictly inside (0, 1).
        alpha: f64,
    },
    /// f(u) = u log u − (u+1) log((u+1)/2).
    JensenShannon,
    /// f(u) = ½(u−1)² + u log u (χPO: χ² plus KL).
    ChiPo,
}

/// Why a divergence could not be built from what the user typed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DivergenceError {
    /// A known divergence that f-DPO cannot use.
    #[error(
        "`{name}` is not admissible for f-DPO: 0 lies in the domain of its f' ({f_prime}), so the \
         optimal policy may put zero mass on some responses and the reward is not identified \
         from the policy; use one of: {choices}"
    )]
    Inadmissible {
        /// What was asked for.
        name: String,
        /// Its f', for the message.
        f_prime: &'static str,
        /// The admissible spellings.
        choices: &'static str,
    },
    /// α outside the open interval (0, 1).
    #[error(
        "alpha must lie strictly inside (0, 1) (the paper's convention: alpha -> 0 is reverse KL, \
         alpha = 1 is forward KL), got {alpha}{hint}"
    )]
    AlphaOutOfRange {
        /// The value given.
        alpha: f64,
        /// A suggestion for the limit cases.
        hint: &'static str,
    },
    /// `alpha:` followed by something that is not a number.
    #[error("`{input}`: expected alpha:<number in (0, 1)>, e.g. alpha:0.5")]
    BadAlpha {
        /// What was typed.
        input: String,
    },
    /// Not a divergence name at all.
    #[error("unknown divergence `{input}`; use one of: {choices}")]
    Unknown {
        /// What was typed.
        input: String,
        /// The admissible spellings.
        choices: &'static str,
    },
}

const CHOICES: &str = "reverse-kl (rkl, kl), forward-kl (fkl), alpha:<a> with 0<a<1, js, chi-po";

impl Divergence {
    /// The α-divergence, validating 0 < α < 1.
    ///
    /// ```
    /// use fdpo_core::Divergence;
    /// assert!(Divergence::alpha(0.5).is_ok());
    /// assert!(Divergence::alpha(1.0).is_err());
    /// ```
    pub fn alpha(alpha: f64) -> Result<Self, DivergenceError> {
        if alpha.is_finite() && alpha > 0.0 && alpha < 1.0 {
            return Ok(Divergence::Alpha { alpha });
        }
        let hint = if alpha == 0.0 {
            "; for the limit alpha -> 0 use reverse-kl"
        } else if alpha == 1.0 {
            "; for alpha = 1 use forward-kl"
        } else if (0.0..=1.0).contains(&(1.0 - alpha)) {
            ""
        } else {
            "; if you took alpha from TRL, the paper's alpha is 1 - TRL's"
        };
        Err(DivergenceError::AlphaOutOfRange { alpha, hint })
    }

    /// The canonical name, which [`FromStr`] parses back.
    pub fn name(&self) -> String {
        match self {
            Divergence::ReverseKl => "reverse-kl".into(),
            Divergence::ForwardKl => "forward-kl".into(),
            Divergence::Alpha { alpha } => format!("alpha:{alpha}"),
            Divergence::JensenShannon => "js".into(),
            Divergence::ChiPo => "chi-po".into(),
        }
    }

    /// The generator f(u) for u ≥ 0 (f(0) is the limit u → 0⁺, possibly +∞).
    ///
    /// ```
    /// use fdpo_core::Divergence;
    /// assert_eq!(Divergence::ReverseKl.f(1.0), 0.0);
    /// ```
    pub fn f(&self, u: f64) -> f64 {
        match *self {
            Divergence::ReverseKl => x_log_x(u),
            Divergence::ForwardKl => -u.ln(),
            Divergence::Alpha { alpha } => {
                (u.powf(1.0 - alpha) - (1.0 - alpha) * u - alpha) / (alpha * (alpha - 1.0))
            }
            Divergence::JensenShannon => x_log_x(u) - (u + 1.0) * ((u + 1.0) / 2.0).ln(),
            Divergence::ChiPo => 0.5 * (u - 1.0).powi(2) + x_log_x(u),
        }
    }

    /// f'(u) for u > 0.
    pub fn f_prime(&self, u: f64) -> f64 {
        self.f_prime_of_log(u.ln())
    }

    /// f'(u) as a function of ℓ = log u — the form the loss uses.
    ///
    /// ```
    /// use fdpo_core::Divergence;
    /// let js = Divergence::JensenShannon;
    /// assert!((js.f_prime_of_log(0.0) - 0.0).abs() < 1e-15); // log(2u/(1+u)) at u = 1
    /// ```
    pub fn f_prime_of_log(&self, log_u: f64) -> f64 {
        match *self {
            Divergence::ReverseKl => log_u + 1.0,
            Divergence::ForwardKl => -(-log_u).exp(),
            Divergence::Alpha { alpha } => -(-alpha * log_u).exp_m1() / alpha,
            Divergence::JensenShannon => LN_2 - softplus(-log_u),
            Divergence::ChiPo => log_u.exp() + log_u,
        }
    }

    /// The supremum of f' over u > 0, i.e. the upper end of the domain of
    /// (f')⁻¹; `None` when f' is unbounded above.
    pub fn f_prime_sup(&self) -> Option<f64> {
        match *self {
            Divergence::ReverseKl | Divergence::ChiPo => None,
            Divergence::ForwardKl => Some(0.0),
            Divergence::Alpha { alpha } => Some(1.0 / alpha),
            Divergence::JensenShannon => Some(LN_2),
        }
    }

    /// (f')⁻¹(v): the ratio u with f'(u) = v, or `None` when v is outside
    /// the domain (v ≥ sup f'). May be +∞ or 0 when u overflows f64.
    ///
    /// ```
    /// use fdpo_core::Divergence;
    /// assert_eq!(Divergence::ForwardKl.f_prime_inverse(-0.5), Some(2.0));
    /// assert_eq!(Divergence::ForwardKl.f_prime_inverse(0.0), None);
    /// ```
    pub fn f_prime_inverse(&self, v: f64) -> Option<f64> {
        self.log_ratio_of_f_prime(v).map(f64::exp)
    }

    /// log (f')⁻¹(v), the ℓ with f'(e^ℓ) = v; `None` outside the domain.
    pub fn log_ratio_of_f_prime(&self, v: f64) -> Option<f64> {
        if v.is_nan() {
            return None;
        }
        match (*self, self.f_prime_sup()) {
            (_, Some(sup)) if v >= sup => None,
            (_, Some(sup)) => Some(self.log_ratio_of_gap(sup - v)),
            (Divergence::ReverseKl, None) => Some(v - 1.0),
            (_, None) => Some(chi_po_log_ratio(v, None)),
        }
    }

    /// For f' bounded above: sup f' − f'(e^ℓ), computed without cancellation.
    /// Positive and decreasing in ℓ. `None` when f' is unbounded.
    pub fn f_prime_gap_of_log(&self, log_u: f64) -> Option<f64> {
        match *self {
            Divergence::ForwardKl => Some((-log_u).exp()),
            Divergence::Alpha { alpha } => Some((-alpha * log_u).exp() / alpha),
            Divergence::JensenShannon => Some(softplus(-log_u)),
            Divergence::ReverseKl | Divergence::ChiPo => None,
        }
    }

    /// Inverse of [`Self::f_prime_gap_of_log`]: the ℓ at which
    /// sup f' − f'(e^ℓ) = gap, for gap > 0 (+∞ at gap = 0). Only meaningful
    /// when f' is bounded above; for the others it returns NaN.
    pub fn log_ratio_of_gap(&self, gap: f64) -> f64 {
        self.log_ratio_of_gap_with_slope(gap).0
    }

    /// [`Self::log_ratio_of_gap`] and its derivative dℓ/dgap (negative).
    pub(crate) fn log_ratio_of_gap_with_slope(&self, gap: f64) -> (f64, f64) {
        match *self {
            Divergence::ForwardKl => (-gap.ln(), -1.0 / gap),
            Divergence::Alpha { alpha } => (-(alpha * gap).ln() / alpha, -1.0 / (alpha * gap)),
            Divergence::JensenShannon => {
                // u = 1/expm1(g): ℓ = −g − log(1 − e^{−g}).
                let one_minus = -(-gap).exp_m1();
                (-gap - one_minus.ln(), -1.0 / one_minus)
            }
            Divergence::ReverseKl | Divergence::ChiPo => (f64::NAN, f64::NAN),
        }
    }

    /// The solver's fast form of [`Self::log_ratio_of_gap_with_slope`]:
    /// the ratio u itself (not its log), dℓ/dgap and d²ℓ/dgap², with at most
    /// one transcendental call. Agrees with the ℓ form (tested).
    #[inline]
    pub(crate) fn ratio_of_gap_with_slopes(&self, gap: f64) -> (f64, f64, f64) {
        match *self {
            Divergence::ForwardKl => {
                // ℓ = −log g.
                let u = 1.0 / gap;
                (u, -u, u * u)
            }
            Divergence::Alpha { alpha } => {
                // ℓ = −log(αg)/α.
                let ag = alpha * gap;
                (exp_or_zero(-ag.ln() / alpha), -1.0 / ag, 1.0 / (ag * gap))
            }
            Divergence::JensenShannon => {
                // u = 1/expm1(g); ℓ' = −e^g/expm1(g) = −(1 + u); ℓ'' = −u' = u(1 + u).
                let u = 1.0 / gap.exp_m1();
                (u, -(1.0 + u), u * (1.0 + u))
            }
            Divergence::ReverseKl | Divergence::ChiPo => (f64::NAN, f64::NAN, f64::NAN),
        }
    }

    /// ℓ and u of [`Self::log_ratio_of_gap`] together, with the fewest
    /// transcendental calls (the solver's final pass).
    #[inline]
    pub(crate) fn log_ratio_and_ratio_of_gap(&self, gap: f64) -> (f64, f64) {
        match *self {
            Divergence::ForwardKl => (-gap.ln(), 1.0 / gap),
            Divergence::JensenShannon => {
                let e = gap.exp_m1();
                if e.is_finite() && e >= f64::MIN_POSITIVE {
                    (-e.ln(), 1.0 / e)
                } else {
                    let l = self.log_ratio_of_gap(gap);
                    (l, exp_or_zero(l))
                }
            }
            _ => {
                let l = self.log_ratio_of_gap(gap);
                (l, exp_or_zero(l))
            }
        }
    }

    /// χPO only, for a block of at most 256 values: ℓ_j and u_j = e^{ℓ_j}
    /// with e^{ℓ_j} + ℓ_j = v_j. With `warm`, `log_ratio` holds starting
    /// iterates: all exponentials first (they pipeline), then one Halley
    /// step each; the few that do not converge in one step are finished one
    /// by one.
    pub(crate) fn chi_po_ratio_block(v: &[f64], log_ratio: &mut [f64], ratio: &mut [f64], warm: bool) {
        let n = v.len();
        if !warm {
            for j in 0..n {
                (log_ratio[j], ratio[j]) = chi_po_log_ratio_and_ratio(v[j], None);
            }
            return;
        }
        let mut e = [0.0; 256];
        for (ej, lj) in e[..n].iter_mut().zip(&log_ratio[..n]) {
            *ej = exp_or_zero(*lj);
        }
        for j in 0..n {
            let (l, ej) = (log_ratio[j], e[j]);
            let g = ej + l - v[j];
            let d1 = ej + 1.0;
            let den = 2.0 * d1 * d1 - g * ej;
            let step = 2.0 * g * d1 / den;
            let next = l - step;
            // Converged in one step (error ≤ step³/6, see chi_po_log_ratio_and_ratio)?
            if den > d1 * d1 && step.abs() <= 1e-5 * next.abs().max(1.0) {
                log_ratio[j] = next;
                ratio[j] = ej * (1.0 - step * (1.0 - step * (0.5 - step / 6.0)));
            } else {
                (log_ratio[j], ratio[j]) = chi_po_log_ratio_and_ratio(v[j], Some(l));
            }
        }
    }

    /// f'(1), the constant that the centred generator removes.
    fn f_prime_at_one(&self) -> f64 {
        self.f_prime_of_log(0.0)
    }

    /// q · f̃(p/q) with f̃(u) = f(u) − f'(1)(u − 1), given log p and log q.
    ///
    /// f̃ ≥ 0 (convexity, f̃(1) = f̃'(1) = 0) and Σ q f̃(p/q) = D_f(p‖q) when
    /// both sum to one, so each term is non-negative and the sum has no
    /// cancellation between terms. log p = −∞ means p = 0 (the term is
    /// q·f̃(0)); log q = −∞ means q = 0 (the term is p · lim f̃(u)/u =
    /// p · (sup f' − f'(1))).
    ///
    /// ```
    /// use fdpo_core::Divergence;
    /// let (p, q) = (0.8f64, 0.5f64);
    /// let want = q * Divergence::ReverseKl.f(p / q) - 1.0 * (p - q); // f'(1) = 1
    /// let got = Divergence::ReverseKl.divergence_term(p.ln(), q.ln());
    /// assert!((got - want).abs() < 1e-15);
    /// ```
    pub fn divergence_term(&self, log_p: f64, log_q: f64) -> f64 {
        self.divergence_term_with(log_p.exp(), log_q.exp(), log_p, log_q)
    }

    /// [`Self::divergence_term`] when p = e^{log p} and q = e^{log q} are
    /// already at hand (the solver's final pass).
    #[inline]
    pub(crate) fn divergence_term_with(&self, p: f64, q: f64, log_p: f64, log_q: f64) -> f64 {
        if log_q == f64::NEG_INFINITY {
            if log_p == f64::NEG_INFINITY {
                return 0.0;
            }
            let slope = match self.f_prime_sup() {
                Some(sup) => sup - self.f_prime_at_one(),
                None => f64::INFINITY,
            };
            return p * slope;
        }
        if log_p == f64::NEG_INFINITY {
            return q * (self.f(0.0) + self.f_prime_at_one());
        }
        let l = log_p - log_q;
        let term = match *self {
            Divergence::ReverseKl => p * l - p + q,
            Divergence::ForwardKl => p - q - q * l,
            Divergence::Alpha { alpha } => {
                let mixed = exp_or_zero(alpha * log_q + (1.0 - alpha) * log_p);
                (mixed - (1.0 - alpha) * p - alpha * q) / (alpha * (alpha - 1.0))
            }
            Divergence::JensenShannon => {
                // softplus(±ℓ) from u = p/q with one log1p: for ℓ > 0,
                // softplus(−ℓ) = log1p(1/u) and softplus(ℓ) = ℓ + softplus(−ℓ).
                let (sp_pos, sp_neg) = if q < f64::MIN_POSITIVE {
                    (softplus(l), softplus(-l))
                } else if l > 0.0 {
                    let neg = (q / p).ln_1p();
                    (l + neg, neg)
                } else {
                    let pos = (p / q).ln_1p();
                    (pos, pos - l)
                };
                -p * sp_neg - q * sp_pos + (p + q) * LN_2
            }
            Divergence::ChiPo => {
                let d = p - q;
                0.5 * d * (d / q) + p * l - p + q
            }
        };
        // Rounding can make a term of size ~1e-17 negative; the true value is ≥ 0.
        term.max(0.0)
    }

    /// D_f(p‖q) = Σ q f(p/q) for probability vectors of equal length.
    ///
    /// ```
    /// use fdpo_core::Divergence;
    /// let p = [0.5, 0.5];
    /// let q = [0.25, 0.75];
    /// let kl = 0.5 * (2.0f64).ln() + 0.5 * (2.0f64 / 3.0).ln();
    /// assert!((Divergence::ReverseKl.divergence(&p, &q) - kl).abs() < 1e-15);
    /// ```
    pub fn divergence(&self, p: &[f64], q: &[f64]) -> f64 {
        assert_eq!(p.len(), q.len(), "divergence: p and q differ in length");
        let mut sum = crate::CompensatedSum::default();
        for (&pi, &qi) in p.iter().zip(q) {
            sum.add(self.divergence_term(pi.ln(), qi.ln()));
        }
        sum.total()
    }
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Divergence {
    type Err = DivergenceError;

    /// Parses what users type: `reverse-kl` (`rkl`, `kl`), `forward-kl`
    /// (`fkl`), `alpha:0.3`, `js`, `chi-po`; case and `_`/`-` are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        if let Some(value) = norm.strip_prefix("alpha:").or(norm.strip_prefix("alpha=")) {
            let alpha: f64 =
                value.trim().parse().map_err(|_| DivergenceError::BadAlpha { input: s.into() })?;
            return Divergence::alpha(alpha);
        }
        let inadmissible =
            |f_prime| Err(DivergenceError::Inadmissible { name: s.trim().into(), f_prime, choices: CHOICES });
        match norm.as_str() {
            "reverse-kl" | "rkl" | "kl" => Ok(Divergence::ReverseKl),
            "forward-kl" | "fkl" => Ok(Divergence::ForwardKl),
            "js" | "jensen-shannon" => Ok(Divergence::JensenShannon),
            "chi-po" | "chipo" | "chi2+kl" | "chi-squared+kl" => Ok(Divergence::ChiPo),
            "tv" | "total-variation" => inadmissible("f'(u) = ±1/2, defined at u = 0"),
            "chi2" | "chi-squared" | "pearson" => inadmissible("f'(u) = 2(u - 1), finite at u = 0"),
            _ => Err(DivergenceError::Unknown { input: s.into(), choices: CHOICES }),
        }
    }
}

impl serde::Serialize for Divergence {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

/// e^x, flushed to 0 where it would be subnormal (below 2.2e-308): libm's
/// underflow path (which sets errno) and arithmetic on subnormal operands
/// are each many times slower, and such values are far below any sum's
/// rounding. Logs are kept separately wherever they matter.
#[inline]
pub(crate) fn exp_or_zero(x: f64) -> f64 {
    if x < -708.39 {
        0.0
    } else {
        x.exp()
    }
}

/// log(1 + e^x) without overflow.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + exp_or_zero(-x).ln_1p()
    } else {
        exp_or_zero(x).ln_1p()
    }
}

/// x log x with the limit 0 at x = 0.
fn x_log_x(x: f64) -> f64 {
    if x == 0.0 {
        0.0
    } else {
        x * x.ln()
    }
}

/// Solves e^ℓ + ℓ = v for ℓ (log of Lambert W(e^v)) by Halley's method.
fn chi_po_log_ratio(v: f64, guess: Option<f64>) -> f64 {
    chi_po_log_ratio_and_ratio(v, guess).0
}

/// [`chi_po_log_ratio`] and e^ℓ, reusing the last step's exponential.
fn chi_po_log_ratio_and_ratio(v: f64, guess: Option<f64>) -> (f64, f64) {
    if v.is_infinite() {
        return (v, v.exp());
    }
    let cold = || {
        if v < 1.0 {
            v - exp_or_zero(v)
        } else {
            // u ≈ v − log v for large v.
            (v - v.ln() * (1.0 - 1.0 / v.max(2.0))).max(0.5).ln()
        }
    };
    let mut l = guess.filter(|g| g.is_finite()).unwrap_or_else(cold);
    let mut restarted = guess.is_none();
    for _ in 0..100 {
        let e = exp_or_zero(l);
        let g = e + l - v;
        if !restarted && g.abs() > 1.0 {
            // A warm start (the root finder's previous iterate) this far off
            // is dropped: from far above, Newton on e^ℓ creeps down by ~1 a step.
            restarted = true;
            l = cold();
            continue;
        }
        // Halley: step = 2·g·g' / (2·g'² − g·g''), with g' = e + 1 and
        // g'' = e; a Newton step when the correction would more than halve it.
        let d1 = e + 1.0;
        let den = 2.0 * d1 * d1 - g * e;
        let step = if den > d1 * d1 { 2.0 * g * d1 / den } else { g / d1 };
        l -= step;
        // Halley's error here is at most step³/6 (the coefficient
        // |e/(6(e+1)) − e²/(4(e+1)²)| is below 1/6): after a step below 1e-5
        // the error is below rounding, so no further evaluation is needed.
        if step.abs() <= 1e-5 * l.abs().max(1.0) {
            // e^{ℓ − step} from e^ℓ by a Taylor series exact to rounding.
            return (l, e * (1.0 - step * (1.0 - step * (0.5 - step / 6.0))));
        }
    }
    (l, exp_or_zero(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Divergence> {
        vec![
            Divergence::ReverseKl,
            Divergence::ForwardKl,
            Divergence::Alpha { alpha: 0.3 },
            Divergence::Alpha { alpha: 0.5 },
            Divergence::Alpha { alpha: 0.9 },
            Divergence::JensenShannon,
            Divergence::ChiPo,
        ]
    }

    /// f' against central finite differences of f (independent of f_prime's code).
    #[test]
    fn f_prime_matches_finite_differences_of_f() {
        for d in all() {
            for &u in &[0.05, 0.3, 1.0, 2.5, 17.0] {
                let h = 1e-5 * u;
                let fd = (d.f(u + h) - d.f(u - h)) / (2.0 * h);
                let fp = d.f_prime(u);
                assert!((fd - fp).abs() < 1e-6 * fp.abs().max(1.0), "{d} u={u}: fd {fd} vs f' {fp}");
            }
        }
    }

    /// f' matches the table of DESIGN.md §1, written out directly in u.
    #[test]
    fn f_prime_matches_design_table() {
        for &u in &[0.1f64, 0.7, 1.0, 3.0, 40.0] {
            assert!((Divergence::ReverseKl.f_prime(u) - (u.ln() + 1.0)).abs() < 1e-13);
            assert!((Divergence::ForwardKl.f_prime(u) - (-1.0 / u)).abs() < 1e-13);
            let a = 0.3;
            let alpha = Divergence::Alpha { alpha: a };
            assert!((alpha.f_prime(u) - (1.0 - u.powf(-a)) / a).abs() < 1e-13);
            let js = (2.0 * u / (1.0 + u)).ln();
            assert!((Divergence::JensenShannon.f_prime(u) - js).abs() < 1e-13);
            assert!((Divergence::ChiPo.f_prime(u) - (u + u.ln())).abs() < 1e-12);
        }
    }

    #[test]
    fn f_vanishes_at_one_and_is_convex() {
        for d in all() {
            assert!(d.f(1.0).abs() < 1e-15, "{d}: f(1) = {}", d.f(1.0));
            for &u in &[0.01, 0.5, 2.0, 9.0] {
                let mid = d.f(u);
                let chord = 0.5 * (d.f(u * 0.9) + d.f(u * 1.1));
                assert!(chord >= mid - 1e-15, "{d} not convex at {u}");
            }
        }
    }

    /// (f')⁻¹(f'(u)) = u over many orders of magnitude of u.
    #[test]
    fn inverse_round_trips_across_the_domain() {
        for d in all() {
            for k in -60..=60 {
                let l = k as f64 * 0.5; // u from e^-30 to e^30
                let v = d.f_prime_of_log(l);
                let back = d.log_ratio_of_f_prime(v).unwrap_or_else(|| panic!("{d}: v={v} refused"));
                // Near the supremum of f' the round trip through v loses
                // precision (v itself is rounded); the gap chart does not.
                let tol = if d.f_prime_sup().is_some() && l > 5.0 { 1e-3 } else { 1e-9 };
                assert!((back - l).abs() < tol * l.abs().max(1.0), "{d}: l={l} back={back}");
                if let Some(gap) = d.f_prime_gap_of_log(l) {
                    let back = d.log_ratio_of_gap(gap);
                    assert!((back - l).abs() < 1e-12 * l.abs().max(1.0), "{d} gap: l={l} back={back}");
                }
            }
        }
    }

    #[test]
    fn inverse_domain_is_below_the_supremum() {
        assert_eq!(Divergence::ForwardKl.f_prime_inverse(0.0), None);
        assert_eq!(Divergence::ForwardKl.f_prime_inverse(1.0), None);
        assert_eq!(Divergence::JensenShannon.f_prime_inverse(LN_2), None);
        assert!(Divergence::JensenShannon.f_prime_inverse(LN_2 - 1e-9).unwrap() > 1e8);
        assert_eq!(Divergence::Alpha { alpha: 0.5 }.f_prime_inverse(2.0), None);
        assert!(Divergence::ReverseKl.f_prime_inverse(1e3).unwrap().is_infinite());
        assert!(Divergence::ChiPo.f_prime_inverse(-1e4).unwrap() == 0.0);
        // (f')⁻¹ of the design table, in closed form.
        let v = -0.7f64;
        assert!((Divergence::ReverseKl.f_prime_inverse(v).unwrap() - (v - 1.0).exp()).abs() < 1e-15);
        let a = 0.3;
        let want = (1.0 - a * v).powf(-1.0 / a);
        assert!((Divergence::Alpha { alpha: a }.f_prime_inverse(v).unwrap() - want).abs() < 1e-14);
        let want = v.exp() / (2.0 - v.exp());
        assert!((Divergence::JensenShannon.f_prime_inverse(v).unwrap() - want).abs() < 1e-14);
    }

    /// D_f ≥ 0, = 0 only at p = q; and matches Σ q f(p/q) written naively.
    #[test]
    fn divergence_is_nonnegative_and_matches_naive_sum() {
        let q = [0.1, 0.2, 0.3, 0.4];
        let ps =
            [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.01, 0.01, 0.01, 0.97]];
        for d in all() {
            for (k, p) in ps.iter().enumerate() {
                let got = d.divergence(p, &q);
                let naive: f64 = p.iter().zip(&q).map(|(pi, qi)| qi * d.f(pi / qi)).sum();
                assert!((got - naive).abs() < 1e-13, "{d} p#{k}: {got} vs naive {naive}");
                if k == 0 {
                    assert!(got.abs() < 1e-16, "{d}: D(q‖q) = {got}");
                } else {
                    assert!(got > 1e-4, "{d}: D(p‖q) = {got} for p ≠ q");
                }
            }
        }
    }

    /// The zero-mass limits of the centred term (p = 0 or q = 0).
    #[test]
    fn divergence_term_limits() {
        // JS(p‖q) with disjoint supports is 2 log 2 in this f's scaling.
        let js = Divergence::JensenShannon.divergence(&[1.0, 0.0], &[0.0, 1.0]);
        assert!((js - 2.0 * LN_2).abs() < 1e-15, "{js}");
        // Reverse KL with p = 0 somewhere is finite; forward KL is infinite.
        assert!(Divergence::ReverseKl.divergence(&[1.0, 0.0], &[0.5, 0.5]).is_finite());
        assert!(Divergence::ForwardKl.divergence(&[1.0, 0.0], &[0.5, 0.5]).is_infinite());
    }

    #[test]
    fn alpha_limits_approach_the_two_kls() {
        // With the centred generator: α → 0 gives u log u − u + 1 (reverse KL),
        // α → 1 gives u − 1 − log u (forward KL).
        for &u in &[0.2f64, 1.7, 6.0] {
            let near0 = Divergence::Alpha { alpha: 1e-7 }.f(u);
            assert!((near0 - (u * u.ln() - u + 1.0)).abs() < 1e-5, "u={u}: {near0}");
            let near1 = Divergence::Alpha { alpha: 1.0 - 1e-7 }.f(u);
            assert!((near1 - (u - 1.0 - u.ln())).abs() < 1e-5, "u={u}: {near1}");
        }
    }

    #[test]
    fn parses_user_spellings() {
        for (s, want) in [
            ("reverse-kl", Divergence::ReverseKl),
            ("rkl", Divergence::ReverseKl),
            ("KL", Divergence::ReverseKl),
            ("forward-kl", Divergence::ForwardKl),
            ("fkl", Divergence::ForwardKl),
            ("alpha:0.3", Divergence::Alpha { alpha: 0.3 }),
            ("js", Divergence::JensenShannon),
            ("chi-po", Divergence::ChiPo),
            ("chi_po", Divergence::ChiPo),
        ] {
            assert_eq!(s.parse::<Divergence>().unwrap(), want, "{s}");
        }
        for d in all() {
            assert_eq!(d.name().parse::<Divergence>().unwrap(), d);
        }
    }

    #[test]
    fn refuses_inadmissible_and_out_of_range() {
        for s in ["tv", "total-variation", "chi2", "chi-squared"] {
            let err = s.parse::<Divergence>().unwrap_err();
            assert!(matches!(err, DivergenceError::Inadmissible { .. }), "{s}");
            assert!(err.to_string().contains("0 lies in the domain of its f'"), "{err}");
        }
        for s in ["alpha:0", "alpha:1", "alpha:1.5", "alpha:-0.2", "alpha:nan"] {
            let err = s.parse::<Divergence>().unwrap_err();
            assert!(matches!(err, DivergenceError::AlphaOutOfRange { .. }), "{s}: {err}");
            assert!(err.to_string().contains("strictly inside (0, 1)"), "{err}");
        }
        assert!(matches!("alpha:x".parse::<Divergence>(), Err(DivergenceError::BadAlpha { .. })));
        assert!(matches!("hellinger".parse::<Divergence>(), Err(DivergenceError::Unknown { .. })));
    }

    /// The solver's fast forms agree with the ℓ forms, and their slopes
    /// with central differences of ℓ.
    #[test]
    fn solver_forms_agree_with_log_forms() {
        for d in all().into_iter().filter(|d| d.f_prime_sup().is_some()) {
            for &g in &[1e-9, 1e-3, 0.3, 2.0, 40.0] {
                let (u, d1, d2) = d.ratio_of_gap_with_slopes(g);
                let l = d.log_ratio_of_gap(g);
                assert!((u - l.exp()).abs() <= 1e-14 * u, "{d} g={g}: u {u} vs e^l {}", l.exp());
                let (l2, u2) = d.log_ratio_and_ratio_of_gap(g);
                assert!((l2 - l).abs() <= 1e-14 * l.abs().max(1.0) && (u2 - u).abs() <= 1e-14 * u);
                let h = 1e-4 * g;
                let (lp, lm) = (d.log_ratio_of_gap(g + h), d.log_ratio_of_gap(g - h));
                let fd1 = (lp - lm) / (2.0 * h);
                let fd2 = (lp - 2.0 * l + lm) / (h * h);
                assert!((fd1 - d1).abs() < 1e-6 * d1.abs(), "{d} g={g}: ℓ' {d1} vs {fd1}");
                assert!((fd2 - d2).abs() < 1e-3 * d2.abs().max(1e-3), "{d} g={g}: ℓ'' {d2} vs {fd2}");
            }
        }
    }

    /// The block Halley solver gives the scalar solver's answer from warm
    /// starts near and far, and cold.
    #[test]
    fn chi_po_block_matches_scalar() {
        let v: Vec<f64> = (0..200).map(|k| -40.0 + 0.3 * k as f64).collect();
        let exact: Vec<(f64, f64)> = v.iter().map(|&x| chi_po_log_ratio_and_ratio(x, None)).collect();
        for (warm, shift) in [(true, 1e-9), (true, 1e-3), (true, 5.0), (false, 0.0)] {
            let mut l: Vec<f64> = exact.iter().map(|e| e.0 + shift).collect();
            let mut u = vec![0.0; v.len()];
            Divergence::chi_po_ratio_block(&v, &mut l, &mut u, warm);
            for k in 0..v.len() {
                assert!(
                    (l[k] - exact[k].0).abs() <= 1e-14 * exact[k].0.abs().max(1.0),
                    "v={}: {} vs {}",
                    v[k],
                    l[k],
                    exact[k].0
                );
                assert!((u[k] - exact[k].1).abs() <= 1e-14 * exact[k].1, "v={}", v[k]);
            }
        }
    }

    #[test]
    fn chi_po_inverse_is_lambert_w() {
        // W(e^v) for v = 1 is W(e) = 1.
        assert!((Divergence::ChiPo.f_prime_inverse(1.0).unwrap() - 1.0).abs() < 1e-15);
        // Large and very negative v.
        for &v in &[-700.0, -30.0, 0.0, 50.0, 1e6, 1e300] {
            let l = Divergence::ChiPo.log_ratio_of_f_prime(v).unwrap();
            let back = l.exp() + l;
            assert!((back - v).abs() <= 1e-13 * v.abs().max(1.0), "v={v}: l={l}, back={back}");
        }
    }
}
