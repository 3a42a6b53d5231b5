//! fdpo-train: preference datasets, f-DPO losses on tensors, the SFT,
//! f-DPO, reward-model and online trainers, schedules, checkpoints, run logs
//! and the built-in synthetic task (shared/DESIGN.md §2).
//!
//! - [`loss`]: the f-DPO losses on tensors (every admissible divergence, the
//!   stable forms of DESIGN.md §1);
//! - [`data`]: preference JSONL in TRL's forms, tokenised with length limits;
//! - [`reference`]: reference log-probabilities cached on disk under a content key;
//! - [`schedule`] and [`optim`]: learning-rate schedules, clipping, AdamW
//!   with saveable state;
//! - [`config`]: the TOML configuration with TRL's names;
//! - [`trainer`]: the loop, metrics.jsonl, checkpoints and exact resume;
//! - [`dpo`] and [`sft`]: the f-DPO and SFT objectives and runs;
//! - [`reward`]: the Bradley–Terry reward-model trainer;
//! - [`online`]: online / iterative f-DPO rounds with a judge;
//! - [`task`]: the built-in review task of `fdpo demo`.

#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod dpo;
pub mod loss;
pub mod online;
pub mod optim;
pub mod reference;
pub mod reward;
pub mod schedule;
pub mod sft;
pub mod task;
pub mod trainer;
