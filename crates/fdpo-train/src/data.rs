//! Preference data for the trainers: pairs read through `fdpo_data`'s one
//! reader (JSONL, Parquet or a dataset folder; TRL's explicit, implicit and
//! conversational forms) and tokenised by its one rule (TRL's: see
//! `fdpo_data::tokenize`), then fitted into the length limits.
//!
//! Limits (TRL 1.16's): prompt + response ≤ `max_length`, by
//! `truncation_mode` (see [`Truncation`]); `max_prompt_length`, when set,
//! first cuts the prompt. Empty or identical chosen/rejected pairs are
//! skipped and counted, never an error.

use std::path::Path;
use std::str::FromStr;

use fdpo_data::records::{read_records, PreferenceRecord};
use fdpo_data::{tokenize_group, DataError};
use fdpo_model::TextTokenizer;

/// How to fit pairs into `max_length` (TRL's `truncation_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the start of each sequence: responses are cut at the end, and a
    /// pair whose prompt alone reaches `max_length` is dropped (TRL 1.16's
    /// default `keep_start`).
    KeepStart,
    /// Keep the end: the prompt loses its start so that the longer sequence
    /// fits (TRL's deprecated `keep_end`, which cuts each sequence on its
    /// own; equal when the responses are of one length); a pair whose
    /// response alone reaches `max_length` is dropped.
    KeepEnd,
    /// Drop pairs that exceed a limit.
    Drop,
}

impl FromStr for Truncation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keep-end" | "keep_end" => Ok(Truncation::KeepEnd),
            "keep-start" | "keep_start" => Ok(Truncation::KeepStart),
            "drop" => Ok(Truncation::Drop),
            _ => Err(format!("unknown truncation `{s}` (keep_start, keep_end, drop)")),
        }
    }
}

/// Length limits in tokens (TRL's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// prompt + response at most.
    pub max_length: usize,
    /// prompt at most, when set (older TRL's key; cut as `truncation` says).
    pub max_prompt_length: Option<usize>,
    /// What to do beyond them.
    pub truncation: Truncation,
}

/// What [`Limits::fit`] did to a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// Nothing cut.
    Whole,
    /// The prompt or a response was cut.
    Truncated,
    /// Over a limit that cutting cannot meet.
    Dropped,
}

impl Limits {
    /// TRL's SFT and KTO limit: the first `max_length` tokens of each
    /// sequence, a prompt that fills them dropped.
    pub(crate) fn keep_start(max_length: usize) -> Limits {
        Limits { max_length, max_prompt_length: None, truncation: Truncation::KeepStart }
    }

    /// Fits a prompt and its responses into the limits, in place.
    pub(crate) fn fit(&self, prompt: &mut Vec<u32>, responses: &mut [&mut Vec<u32>]) -> Fit {
        let mut fit = Fit::Whole;
        if let Some(m) = self.max_prompt_length.filter(|&m| prompt.len() > m) {
            match self.truncation {
                Truncation::Drop => return Fit::Dropped,
                Truncation::KeepStart => prompt.truncate(m),
                Truncation::KeepEnd => {
                    prompt.drain(..prompt.len() - m);
                }
            }
            fit = Fit::Truncated;
        }
        let longest = responses.iter().map(|r| r.len()).max().unwrap_or(0);
        if prompt.len() + longest <= self.max_length {
            return fit;
        }
        match self.truncation {
            Truncation::Drop => return Fit::Dropped,
            Truncation::KeepStart => {
                if prompt.len() >= self.max_length {
                    return Fit::Dropped;
                }
                let room = self.max_length - prompt.len();
                for r in responses.iter_mut() {
                    r.truncate(room);
                }
            }
            Truncation::KeepEnd => {
                if longest >= self.max_length {
                    return Fit::Dropped;
                }
                prompt.drain(..prompt.len() + longest - self.max_length);
            }
        }
        Fit::Truncated
    }
}

/// One tokenised preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// `id` from the file, else `line-N` (JSONL) or `row-N` (Parquet).
    pub id: String,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Chosen response ids.
    pub chosen: Vec<u32>,
    /// Rejected response ids.
    pub rejected: Vec<u32>,
}

/// Pairs read from a file, with what was skipped or cut.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PreferenceData {
    /// The usable pairs, in file order.
    pub pairs: Vec<PreferencePair>,
    /// Records skipped because chosen or rejected was empty.
    pub skipped_empty: usize,
    /// Records skipped because chosen equals rejected.
    pub skipped_identical: usize,
    /// Pairs whose prompt or a response was truncated.
    pub truncated: usize,
    /// Pairs dropped for exceeding a limit (`drop`).
    pub dropped: usize,
}

/// Reads and tokenises the `split` of a preference data path.
pub fn read_preferences(
    path: &Path,
    split: &str,
    tokenizer: &TextTokenizer,
    limits: &Limits,
) -> Result<PreferenceData, DataError> {
    let mut data = PreferenceData::default();
    for (at, record) in read_records::<PreferenceRecord>(path, split)? {
        let id = record.id.clone().unwrap_or_else(|| at.default_id());
        let pair = record.pair().map_err(|m| DataError::record(&at, m))?;
        if pair.chosen.is_blank() || pair.rejected.is_blank() {
            data.skipped_empty += 1;
            continue;
        }
        if pair.chosen == pair.rejected {
            data.skipped_identical += 1;
            continue;
        }
        let group = tokenize_group(
            tokenizer,
            &pair.prompt,
            &[("chosen", &pair.chosen), ("rejected", &pair.rejected)],
            true,
        )
        .map_err(DataError::tokenize(&at))?;
        let mut p_ids = group.prompt;
        let [mut c_ids, mut r_ids]: [Vec<u32>; 2] =
            group.responses.try_into().expect("two responses in, two out");
        match limits.fit(&mut p_ids, &mut [&mut c_ids, &mut r_ids]) {
            Fit::Whole => {}
            Fit::Truncated => data.truncated += 1,
            Fit::Dropped => {
                data.dropped += 1;
                continue;
            }
        }
        data.pairs.push(PreferencePair { id, prompt: p_ids, chosen: c_ids, rejected: r_ids });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fdpo_model::logprobs::NO_CONTEXT;
    use fdpo_model::ChatMessage;

    fn tokenizer() -> TextTokenizer {
        tokenizer_of("llama")
    }

    fn tokenizer_of(family: &str) -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures").join(family);
        TextTokenizer::load(&dir).unwrap()
    }

    fn read(text: &str, limits: Limits) -> Result<PreferenceData, DataError> {
        read_with(text, limits, &tokenizer())
    }

    fn read_with(text: &str, limits: Limits, tokenizer: &TextTokenizer) -> Result<PreferenceData, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prefs.jsonl");
        std::fs::write(&path, text).unwrap();

        read_preferences(&path, "train", tokenizer, &limits)
    }

    const WIDE: Limits =
        Limits { max_length: 64, max_prompt_length: None, truncation: Truncation::KeepStart };

    /// An empty prompt under a tokenizer that adds no BOS (GPT-2) leaves
    /// the responses' first token without context: an error by line, as in
    /// `fdpo logprobs`. Under Llama's (BOS) it is fine.
    #[test]
    fn an_empty_prompt_without_bos_is_an_error() {
        let lines = "{\"prompt\": \"a\", \"chosen\": \" b\", \"rejected\": \" c\"}\n\
                     {\"prompt\": \"\", \"chosen\": \"good\", \"rejected\": \"bad\"}\n";
        let e = read_with(lines, WIDE, &tokenizer_of("gpt2")).unwrap_err().to_string();
        assert!(e.ends_with(&format!("prefs.jsonl:2: field `prompt`: {NO_CONTEXT}")), "{e}");
        // No common prefix in the implicit form: the same.
        let e = read_with("{\"chosen\": \"good\", \"rejected\": \"bad\"}\n", WIDE, &tokenizer_of("gpt2"));
        assert!(e.unwrap_err().to_string().contains(NO_CONTEXT));
        assert_eq!(read(lines, WIDE).unwrap().pairs.len(), 2);
    }

    #[test]
    fn explicit_pairs_follow_the_logprobs_convention() {
        let tok = tokenizer();
        let data =
            read(r#"{"id": "a", "prompt": "the film was", "chosen": " good", "rejected": " bad"}"#, WIDE)
                .unwrap();
        let p = &data.pairs[0];
        assert_eq!(p.id, "a");
        // TRL's rule: prompt + response encoded whole, EOS appended, cut after the prompt.
        assert_eq!(
            [p.prompt.clone(), p.chosen.clone()].concat(),
            tok.encode("the film was good</s>", true).unwrap()
        );
        assert_eq!(
            [p.prompt.clone(), p.rejected.clone()].concat(),
            tok.encode("the film was bad</s>", true).unwrap()
        );
        assert!(tok.encode("the film was", true).unwrap().starts_with(&p.prompt));
    }

    #[test]
    fn implicit_prompt_is_the_common_prefix() {
        let tok = tokenizer();
        let data = read(r#"{"chosen": "the film was good", "rejected": "the film was bad"}"#, WIDE).unwrap();
        // TRL's extract_prompt: the space before the difference starts the responses.
        assert_eq!(data.pairs[0].prompt, tok.encode("the film was", true).unwrap());
        assert_eq!(data.pairs[0].id, "line-1");
    }

    #[test]
    fn conversational_pairs_use_the_chat_template() {
        let tok = tokenizer();
        let line = r#"{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}"#;
        let data = read(line, WIDE).unwrap();
        let hi = [ChatMessage { role: "user".into(), content: "hi".into() }];
        let rendered = tok.apply_chat_template(&hi, true).unwrap();
        assert_eq!(data.pairs[0].prompt, tok.encode(&rendered, false).unwrap());
        // The template's "<|assistant|> good</s>" minus the prompt's "<|assistant|>".
        assert_eq!(tok.decode(&data.pairs[0].chosen, false).unwrap().trim_start(), "good</s>");
    }

    #[test]
    fn empty_and_identical_pairs_are_skipped_and_counted() {
        let text = [
            r#"{"prompt": "p", "chosen": "", "rejected": "x"}"#,
            r#"{"prompt": "p", "chosen": "same", "rejected": "same"}"#,
            r#"{"prompt": "p", "chosen": "good", "rejected": "bad"}"#,
        ]
        .join("\n");
        let data = read(&text, WIDE).unwrap();
        assert_eq!((data.pairs.len(), data.skipped_empty, data.skipped_identical), (1, 1, 1));
    }

    #[test]
    fn limits_truncate_or_drop_and_count() {
        let long = "the film was good and the acting was great".repeat(4);
        let line = serde_json::json!({"prompt": long, "chosen": " good", "rejected": " bad"}).to_string();
        let tok = tokenizer();
        let whole = |r: &str| tok.encode(&format!("{long}{r}</s>"), true).unwrap();
        let uncut = read(&line, WIDE).unwrap().pairs.remove(0);
        assert_eq!([uncut.prompt.clone(), uncut.chosen.clone()].concat(), whole(" good"));
        let p = uncut.prompt.len();
        let limits = |max_prompt_length, truncation| Limits { max_length: 12, max_prompt_length, truncation };
        // max_prompt_length first: keep_end keeps the prompt's end, keep_start its start.
        let end = read(&line, limits(Some(8), Truncation::KeepEnd)).unwrap();
        assert_eq!((end.truncated, end.dropped), (1, 0));
        assert_eq!(end.pairs[0].prompt, uncut.prompt[p - 8..]);
        assert_eq!(end.pairs[0].chosen, uncut.chosen, "the responses fit beside 8 prompt tokens");
        let start = read(&line, limits(Some(8), Truncation::KeepStart)).unwrap();
        assert_eq!(start.pairs[0].prompt, uncut.prompt[..8]);
        // TRL 1.16 (no max_prompt_length): keep_start drops a pair whose prompt
        // reaches max_length; keep_end cuts the prompt's start to fit the longer response.
        let start = read(&line, limits(None, Truncation::KeepStart)).unwrap();
        assert_eq!((start.pairs.len(), start.dropped), (0, 1));
        let end = read(&line, limits(None, Truncation::KeepEnd)).unwrap();
        let longest = uncut.chosen.len().max(uncut.rejected.len());
        assert_eq!(end.pairs[0].prompt, uncut.prompt[p - (12 - longest)..]);
        // keep_start cuts the responses at the end when the prompt leaves room.
        let short = serde_json::json!({"prompt": "the film", "chosen": long, "rejected": " bad"}).to_string();
        let cut = read(&short, limits(None, Truncation::KeepStart)).unwrap();
        let pair = &cut.pairs[0];
        assert_eq!((cut.truncated, pair.prompt.len() + pair.chosen.len()), (1, 12));
        let dropped = read(&line, limits(Some(8), Truncation::Drop)).unwrap();
        assert_eq!((dropped.pairs.len(), dropped.dropped), (0, 1));
    }

    #[test]
    fn malformed_lines_name_file_line_and_field() {
        let e = read("{\"prompt\": \"p\", \"chosen\": \"a\"}\n", WIDE).unwrap_err().to_string();
        assert!(e.ends_with("prefs.jsonl:1: field `rejected`: missing"), "{e}");
        let e = read("\n{\"prompt\": \"p\", \"chosen\": 3, \"rejected\": \"b\"}\n", WIDE)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prefs.jsonl:2: field `chosen`: invalid type: integer `3`, expected a string or a list of {role, content} messages"),
            "{e}"
        );
        let e = read("{oops}\n", WIDE).unwrap_err().to_string();
        assert!(e.contains("prefs.jsonl:1: invalid JSON"), "{e}");
        let e = read(r#"{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}"#, WIDE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one is text, the other messages"), "{e}");
    }
}
