//! Samples files: one `{"prompt": ..., "responses": [...]}` record per line
//! or row (other fields are kept but ignored), read through `fdpo_data`'s
//! one reader, so JSONL and Parquet alike. Errors name the file, line and
//! field.

use std::path::Path;

use fdpo_data::records::{read_records, SamplesRecord};
use fdpo_data::{DataError, Location, Text};

/// One prompt and its sampled responses.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSet {
    /// The prompt: text, or chat messages.
    pub prompt: Text,
    /// The responses, in file order.
    pub responses: Vec<String>,
    /// Where it came from (line 0 when not from a file).
    pub at: Location,
}

impl SampleSet {
    /// A set that comes from no file (tests, the demo).
    pub fn new(prompt: &str, responses: Vec<String>) -> SampleSet {
        SampleSet { prompt: Text::Plain(prompt.into()), responses, at: Location::line(Path::new("-"), 0) }
    }
}

/// Reads a samples file; every prompt needs at least one response, and the
/// file at least one prompt.
pub fn read_samples(path: &Path) -> Result<Vec<SampleSet>, DataError> {
    let mut out = Vec::new();
    for (at, record) in read_records::<SamplesRecord>(path, "train")? {
        if record.responses.is_empty() {
            return Err(DataError::record(&at, format!("{} `responses`: the list is empty", at.noun())));
        }
        out.push(SampleSet { prompt: record.prompt, responses: record.responses, at });
    }
    if out.is_empty() {
        return Err(DataError::File { path: path.into(), message: "no samples".into() });
    }
    Ok(out)
}
