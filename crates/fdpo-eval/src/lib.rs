//! fdpo-eval: diversity and bias evaluation over sample and judgement files
//! (docs/DESIGN.md §2 and §4).
//!
//! - [`samples`]: `{prompt, responses: [...]}` files, as `fdpo generate`
//!   writes them, read through `fdpo_data` (JSONL or Parquet) with
//!   `file:line: field` errors;
//! - [`report`]: per-input and across-input diversity of such a file with
//!   the model-free metrics of `fdpo_core::diversity`;
//! - [`audit`]: verbosity, equal-opportunity gap, length-controlled win
//!   rate, position bias and self-preference.
//!
//! Sentence-embedding diversity and policy entropy use fdpo-model's
//! encoder and causal models, NLI diversity its BERT/RoBERTa classifier.
//! Reward scoring of samples is `fdpo reward score` (fdpo-cli), which needs
//! a reward model or the demo task.

#![warn(missing_docs)]

pub mod audit;
pub mod report;
pub mod samples;
