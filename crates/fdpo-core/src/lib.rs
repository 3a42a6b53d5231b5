//! fdpo-core: the mathematics of f-DPO with no tensor library underneath.
//!
//! - [`Divergence`]: the admissible f-divergences and every formula that
//!   depends on f (docs/DESIGN.md §1).
//! - [`solve_prompt`]: the exact optimal policy on a finite response set.
//! - [`instance`]: the exact lab's instance files and random instances.
//! - [`lab`]: the experiments built on the solver (frontier, gap, coverage);
//! - [`loss`]: the f-DPO pair losses in f64, the reference of the tensor losses;
//! - [`diversity`]: text diversity metrics that need no model.
//!
//! It holds no model code and does not depend on candle.

#![warn(missing_docs)]

mod atomic;
mod compensated;
mod divergence;
pub mod diversity;
pub mod instance;
pub mod lab;
pub mod loss;
mod memory;
mod solver;

pub use atomic::write_atomic;
pub use instance::{Instance, InstanceError, Prompt};

pub use compensated::{log_sum_exp, CompensatedSum};
pub use divergence::{softplus, Divergence, DivergenceError};
pub use solver::{
    evaluate_policy, normalise_ref_logprobs, solve_prompt, PolicyValue, PromptSolution, SolveError,
};
