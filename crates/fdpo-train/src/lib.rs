//! fdpo-train: preference datasets, f-DPO losses on tensors, the SFT,
//! f-DPO, reward-model and online trainers, schedules, checkpoints, run logs
//! and the built-in synthetic task (shared/DESIGN.md §2).
//!
//! Built so far: [`loss`], the f-DPO losses on tensors (every admissible
//! divergence, the stable forms of DESIGN.md §1); [`data`], preference
//! JSONL in TRL's forms, tokenised with length limits; [`reference`],
//! reference log-probabilities cached on disk under a content key; and
//! [`schedule`], learning-rate schedules and gradient clipping; [`config`],
//! the TOML configuration with TRL's names. The
//! trainer, reward model, online loop and demo task are their own issues.

#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod loss;
pub mod reference;
pub mod schedule;
