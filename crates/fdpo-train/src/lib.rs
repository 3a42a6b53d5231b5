//! fdpo-train: preference datasets, f-DPO losses on tensors, the SFT,
//! f-DPO, reward-model and online trainers, schedules, checkpoints, run logs
//! and the built-in synthetic task (docs/DESIGN.md §2).
//!
//! - [`loss`]: the f-DPO losses on tensors (every admissible divergence, the
//!   stable forms of docs/DESIGN.md §1);
//! - [`data`]: preference pairs read and tokenised by `fdpo_data`, fitted into
//!   the length limits;
//! - [`reference`]: reference log-probabilities cached on disk under a content key;
//! - [`schedule`] and [`optim`]: learning-rate schedules, clipping, AdamW
//!   with saveable state;
//! - [`config`]: one configuration definition per trainer (TOML with TRL's
//!   names, or TRL's CLI YAML), which also makes the flags;
//! - [`trainer`]: the loop, metrics.jsonl, checkpoints and exact resume;
//! - [`dpo`] and [`sft`]: the f-DPO and SFT objectives and runs;
//! - [`kto`]: KTO on unpaired examples, as TRL's KTOTrainer;
//! - [`reward`]: the Bradley–Terry reward-model trainer;
//! - [`online`]: online / iterative f-DPO rounds with a judge;
//! - [`task`]: the built-in review task of `fdpo demo`.

#![warn(missing_docs)]

pub mod config;
pub mod data;
pub mod dpo;
pub mod kto;
pub mod loss;
pub mod online;
pub mod optim;
pub mod parallel;
pub mod reference;
pub mod reward;
pub mod schedule;
pub mod sft;
pub mod task;
pub mod trainer;
