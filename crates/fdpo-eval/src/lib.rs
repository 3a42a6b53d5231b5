//! fdpo-eval: diversity and bias evaluation over sample and judgement files
//! (shared/DESIGN.md §2 and §4).
//!
//! - [`samples`]: `{prompt, responses: [...]}` JSONL files, as `fdpo
//!   generate` writes them, read with `file:line: field` errors;
//! - [`report`]: per-input and across-input diversity of such a file with
//!   the model-free metrics of `fdpo_core::diversity`;
//! - [`audit`]: verbosity, equal-opportunity gap, length-controlled win
//!   rate, position bias and self-preference.
//!
//! Sentence-embedding diversity and policy entropy use fdpo-model's
//! encoder and causal models, NLI diversity its BERT/RoBERTa classifier.
//! Not built yet: reward scoring (needs the reward model or the demo task).

#![warn(missing_docs)]

pub mod audit;
pub mod report;
pub mod samples;
