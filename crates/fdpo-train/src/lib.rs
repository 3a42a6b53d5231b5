//! fdpo-train: preference datasets, f-DPO losses on tensors, the SFT,
//! f-DPO, reward-model and online trainers, schedules, checkpoints, run logs
//! and the built-in synthetic task (shared/DESIGN.md §2).
//!
//! Not built yet: this crate only fixes its place in the layering (on
//! fdpo-model, beside fdpo-eval, below fdpo-cli).
