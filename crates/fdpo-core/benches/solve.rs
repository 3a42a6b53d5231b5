//! Benchmark: solving one prompt with 1e6 responses, every divergence.
//!
//! `cargo bench -p fdpo-core --bench solve` prints the median wall time of
//! `solve_prompt` per divergence and β, with root-finder iterations. The
//! target (issue: exact lab) is under 50 ms per prompt of 1e6 responses.

use std::time::Instant;

use fdpo_core::{normalise_ref_logprobs, solve_prompt, Divergence};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() {
    let m: usize =
        std::env::var("FDPO_BENCH_RESPONSES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let repeats = 7;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // Reference log-probs of a peaked distribution (a language model's
    // sequence probabilities span many orders of magnitude) and rewards in ±1.
    let logits: Vec<f64> = (0..m).map(|_| rng.random_range(-30.0..0.0)).collect();
    let (log_q, _) = normalise_ref_logprobs(&logits).unwrap();
    let rewards: Vec<f64> = (0..m).map(|_| rng.random_range(-1.0..1.0)).collect();
    println!("solve_prompt, {m} responses, median of {repeats} runs");
    println!("{:<12} {:>8} {:>10} {:>6} {:>12}", "divergence", "beta", "ms", "iters", "|sum-1|");
    let all = ["reverse-kl", "forward-kl", "alpha:0.3", "alpha:0.7", "js", "chi-po"];
    // FDPO_BENCH_DIVERGENCE=js restricts the run to one divergence.
    let only = std::env::var("FDPO_BENCH_DIVERGENCE").ok();
    let divergences = all.iter().filter(|d| only.as_deref().is_none_or(|o| o == **d));
    let mut worst: f64 = 0.0;
    for name in divergences {
        let div: Divergence = name.parse().unwrap();
        for beta in [1e-3, 0.1, 10.0] {
            let mut times = Vec::new();
            let mut iters = 0;
            let mut residual = 0.0;
            for _ in 0..repeats {
                let start = Instant::now();
                let sol = solve_prompt(div, beta, &log_q, &rewards).unwrap();
                times.push(start.elapsed().as_secs_f64() * 1e3);
                iters = sol.iterations;
                residual = sol.root_residual;
                std::hint::black_box(&sol);
            }
            times.sort_by(f64::total_cmp);
            let median = times[repeats / 2];
            worst = worst.max(median);
            println!("{:<12} {:>8} {:>10.1} {:>6} {:>12.1e}", name, beta, median, iters, residual);
        }
    }
    println!("slowest median: {worst:.1} ms (target < 50 ms)");
}
