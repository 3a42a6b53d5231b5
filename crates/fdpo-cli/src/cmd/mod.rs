//! Subcommands of the `fdpo` binary, one module each.

pub mod audit;
pub mod bench;
pub mod demo;
pub mod eval;
pub mod exact;
pub mod generate;
pub mod logprobs;
pub mod merge;
pub mod model_args;
pub mod online;
pub mod parse;
pub mod review;
pub mod reward;
pub mod sweep;
pub mod train;
