//! fdpo-eval: per-input diversity and bias audits over sample and
//! judgement files (shared/DESIGN.md §2 and §4).
//!
//! Not built yet: this crate only fixes its place in the layering (on
//! fdpo-model, beside fdpo-train, below fdpo-cli).
