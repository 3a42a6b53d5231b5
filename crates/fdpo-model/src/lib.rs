//! fdpo-model: causal language models (Llama family, Qwen2, GPT-2) and the
//! scalar-head reward model in candle, Hugging Face checkpoint and tokenizer
//! loading, sequence log-probabilities, sampling, and the sentence-embedding
//! and NLI encoders (shared/DESIGN.md §2).
//!
//! Not built yet: this crate only fixes its place in the layering
//! (fdpo-core below it; fdpo-train and fdpo-eval above). The language-model
//! core is its own issue; candle enters the dependency tree with it.
