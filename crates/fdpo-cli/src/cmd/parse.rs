//! Value parsers of numeric options with a range, so that clap refuses a bad
//! value while parsing, naming the option and the value: `error: invalid
//! value '0' for '--beta <BETA>': must be finite and > 0, got 0`.

/// A finite number > 0 (β, a β grid's ends).
pub fn positive(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(format!("must be finite and > 0, got {s}"))
    }
}

/// A finite number ≥ 0 (a sampling temperature).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("must be finite and >= 0, got {s}"))
    }
}

/// A probability in (0, 1] (top-p).
pub fn probability(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if x > 0.0 && x <= 1.0 {
        Ok(x)
    } else {
        Err(format!("must be in (0, 1], got {s}"))
    }
}

/// A number in [0, 1] (an interpolation's t).
pub fn probability_closed(s: &str) -> Result<f64, String> {
    let x = number(s)?;
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("must be in [0, 1], got {s}"))
    }
}

/// A count ≥ 1 (batch sizes, vocabulary sizes).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| format!("expected a whole number, got {s}"))?;
    if n >= 1 {
        Ok(n)
    } else {
        Err(format!("must be at least 1, got {s}"))
    }
}

/// A matrix-product shape `MxKxN` (an M×K by K×N product), each at least 1.
pub fn gemm_shape(s: &str) -> Result<(usize, usize, usize), String> {
    let dims: Vec<&str> = s.split(['x', 'X']).collect();
    if dims.len() != 3 {
        return Err(format!("expected MxKxN (three sizes joined by x), got {s}"));
    }
    let mut out = [0usize; 3];
    for (o, d) in out.iter_mut().zip(&dims) {
        *o = at_least_one(d)?;
    }
    Ok((out[0], out[1], out[2]))
}

fn number(s: &str) -> Result<f64, String> {
    s.trim().parse().map_err(|_| format!("expected a number, got {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_include_their_ends_and_refuse_the_rest() {
        assert_eq!(positive("0.5"), Ok(0.5));
        for bad in ["0", "-1", "inf", "NaN"] {
            assert_eq!(positive(bad), Err(format!("must be finite and > 0, got {bad}")));
        }
        assert_eq!(non_negative("0"), Ok(0.0));
        assert_eq!(non_negative("inf"), Err("must be finite and >= 0, got inf".into()));
        assert_eq!(non_negative("-0.1"), Err("must be finite and >= 0, got -0.1".into()));
        assert_eq!(probability("1"), Ok(1.0));
        assert_eq!(probability("0"), Err("must be in (0, 1], got 0".into()));
        assert_eq!(probability("NaN"), Err("must be in (0, 1], got NaN".into()));
        assert_eq!(at_least_one("1"), Ok(1));
        assert_eq!(at_least_one("0"), Err("must be at least 1, got 0".into()));
        assert_eq!(positive("x"), Err("expected a number, got x".into()));
    }
}
