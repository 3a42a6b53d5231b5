//! A user's data, read as TRL reads it: one record type per kind of file
//! and one tokenisation rule, so that no two commands read a line apart.
//!
//! - [`records`]: where rows come from (a `.jsonl` file, a `.parquet`
//!   file, or a Hugging Face dataset folder of Parquet shards) and the
//!   serde-derived records read from them — preference pairs (explicit,
//!   implicit prompt, conversational), SFT examples, unpaired (KTO)
//!   examples, samples files and judgements — where a prompt or response
//!   is [`Text`]: a string or a list of `{role, content}` messages.
//! - [`parquet`]: Parquet rows as JSON objects (nested
//!   `list<struct<role, content>>` columns included), errors by row and
//!   column.
//! - [`tokenize`]: TRL's convention, the only place that turns a prompt and
//!   a response into token ids.
//!
//! Errors name the file and the line (JSONL, 1-based) or row (Parquet,
//! 0-based as in `datasets`) and the field or column. Everything here is
//! checked before a command writes anything.

pub mod parquet;
pub mod records;
pub mod tokenize;

pub use records::{DataError, Location, Text};
pub use tokenize::{tokenize, tokenize_group, tokenize_prompt, Tokenized, TokenizedGroup};
