//! Preference data in TRL's forms, read from JSONL and tokenised as TRL
//! users expect.
//!
//! Forms (one JSON object per line, optional `id`):
//! - explicit: `{"prompt", "chosen", "rejected"}` with strings;
//! - implicit: `{"chosen", "rejected"}` only; the prompt is their longest
//!   common prefix (messages for conversational data, characters otherwise);
//! - conversational: the fields are lists of `{role, content}` messages; the
//!   prompt is rendered with the model's chat template and a generation
//!   prompt, a response is the rendering of prompt + response after the
//!   rendered prompt (as TRL's `maybe_apply_chat_template`).
//!
//! Tokenisation (the convention of `fdpo logprobs`): the prompt with the
//! tokenizer's special tokens (plain text) or as rendered (templated), each
//! response without special tokens, EOS appended to plain-text responses.
//! Limits: the prompt is cut to `max_prompt_length`, then responses so that
//! prompt + response ≤ `max_length`; `keep-end` keeps the end of the prompt,
//! `keep-start` its start, `drop` drops pairs over a limit. Empty or
//! identical chosen/rejected pairs are skipped and counted, never an error.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use fdpo_model::logprobs::{has_context, NO_CONTEXT};
use fdpo_model::{ChatMessage, TextTokenizer};
use serde_json::{Map, Value};

/// What is wrong with a preference file; messages name file, line and field.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is malformed.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong, naming the field.
        message: String,
    },
    /// Rendering or tokenising failed.
    #[error("{path}:{line}: {source}")]
    Model {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The tokenizer's or template's error.
        source: Box<fdpo_model::ModelError>,
    },
}

/// How to fit pairs into the length limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the end of the prompt (TRL's default `keep_end`).
    KeepEnd,
    /// Keep the start of the prompt.
    KeepStart,
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
            _ => Err(format!("unknown truncation `{s}` (keep-end, keep-start, drop)")),
        }
    }
}

/// Length limits in tokens (TRL's names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// prompt + response at most.
    pub max_length: usize,
    /// prompt at most.
    pub max_prompt_length: usize,
    /// What to do beyond them.
    pub truncation: Truncation,
}

/// One tokenised preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// `id` from the file, else `line-N`.
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
    /// Lines skipped because chosen or rejected was empty.
    pub skipped_empty: usize,
    /// Lines skipped because chosen equals rejected.
    pub skipped_identical: usize,
    /// Pairs whose prompt or a response was truncated.
    pub truncated: usize,
    /// Pairs dropped for exceeding a limit (`drop`).
    pub dropped: usize,
}

/// A field's value: plain text or chat messages.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    Text(String),
    Messages(Vec<ChatMessage>),
}

fn field(obj: &Map<String, Value>, name: &str) -> Result<Option<Field>, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(Field::Text(s.clone()))),
        Some(v @ Value::Array(_)) => serde_json::from_value::<Vec<ChatMessage>>(v.clone())
            .map(|m| Some(Field::Messages(m)))
            .map_err(|_| format!("field `{name}`: expected a list of {{role, content}} messages")),
        Some(other) => Err(format!("field `{name}`: expected a string or a list of messages, found {other}")),
    }
}

/// Longest common prefix of two strings, at a character boundary.
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i);
    &a[..end]
}

/// Cuts `ids` to `n` tokens, keeping the start or the end.
fn cut(ids: &mut Vec<u32>, n: usize, keep_end: bool) {
    if ids.len() > n {
        if keep_end {
            ids.drain(..ids.len() - n);
        } else {
            ids.truncate(n);
        }
    }
}

/// Reads and tokenises a preference JSONL file.
pub fn read_preferences(
    path: &Path,
    tokenizer: &TextTokenizer,
    limits: &Limits,
) -> Result<PreferenceData, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    let mut data = PreferenceData::default();
    let eos = tokenizer.eos_id();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let err = |message: String| DataError::Line { path: path.into(), line: n, message };
        let model_err = |source| DataError::Model { path: path.into(), line: n, source: Box::new(source) };
        let value: Value = serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
        let id = match obj.get("id") {
            None | Some(Value::Null) => format!("line-{n}"),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            Some(other) => {
                return Err(err(format!("field `id`: expected a string or number, found {other}")))
            }
        };
        let chosen =
            field(obj, "chosen").map_err(&err)?.ok_or_else(|| err("missing field `chosen`".into()))?;
        let rejected =
            field(obj, "rejected").map_err(&err)?.ok_or_else(|| err("missing field `rejected`".into()))?;
        let prompt = field(obj, "prompt").map_err(&err)?;
        // Resolve the implicit form into (prompt, chosen, rejected).
        let (prompt, chosen, rejected) = match (prompt, chosen, rejected) {
            (Some(p), c, r) => (p, c, r),
            (None, Field::Text(c), Field::Text(r)) => {
                let p = common_prefix(&c, &r).to_string();
                (Field::Text(p.clone()), Field::Text(c[p.len()..].into()), Field::Text(r[p.len()..].into()))
            }
            (None, Field::Messages(c), Field::Messages(r)) => {
                let k = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                (
                    Field::Messages(c[..k].to_vec()),
                    Field::Messages(c[k..].to_vec()),
                    Field::Messages(r[k..].to_vec()),
                )
            }
            _ => return Err(err("fields `chosen` and `rejected`: one is text, the other messages".into())),
        };
        let empty = |f: &Field| match f {
            Field::Text(s) => s.trim().is_empty(),
            Field::Messages(m) => m.iter().all(|x| x.content.trim().is_empty()),
        };
        if empty(&chosen) || empty(&rejected) {
            data.skipped_empty += 1;
            continue;
        }
        if chosen == rejected {
            data.skipped_identical += 1;
            continue;
        }
        let (mut p_ids, mut c_ids, mut r_ids) = match (&prompt, &chosen, &rejected) {
            (Field::Text(p), Field::Text(c), Field::Text(r)) => {
                let with_eos = |s: &str| -> Result<Vec<u32>, DataError> {
                    let mut ids = tokenizer.encode(s, false).map_err(model_err)?;
                    ids.extend(eos);
                    Ok(ids)
                };
                (tokenizer.encode(p, true).map_err(model_err)?, with_eos(c)?, with_eos(r)?)
            }
            (Field::Messages(p), Field::Messages(c), Field::Messages(r)) => {
                let rendered_prompt = tokenizer.apply_chat_template(p, true).map_err(model_err)?;
                let completion = |resp: &[ChatMessage]| -> Result<Vec<u32>, DataError> {
                    let full = [p.as_slice(), resp].concat();
                    let rendered = tokenizer.apply_chat_template(&full, false).map_err(model_err)?;
                    let tail = rendered.strip_prefix(&rendered_prompt).unwrap_or(&rendered);
                    tokenizer.encode(tail, false).map_err(model_err)
                };
                (
                    tokenizer.encode(&rendered_prompt, false).map_err(model_err)?,
                    completion(c)?,
                    completion(r)?,
                )
            }
            _ => return Err(err("field `prompt`: text with message responses (or the reverse)".into())),
        };
        if !has_context(&p_ids, &c_ids) || !has_context(&p_ids, &r_ids) {
            // e.g. `"prompt": ""`, or implicit pairs with no common prefix,
            // under GPT-2's or Qwen2's tokenizer.
            return Err(err(format!("field `prompt`: {NO_CONTEXT}")));
        }
        let over = p_ids.len() > limits.max_prompt_length
            || p_ids.len().min(limits.max_prompt_length) + c_ids.len().max(r_ids.len()) > limits.max_length;
        if over {
            if limits.truncation == Truncation::Drop {
                data.dropped += 1;
                continue;
            }
            cut(&mut p_ids, limits.max_prompt_length, limits.truncation == Truncation::KeepEnd);
            let room = limits.max_length.saturating_sub(p_ids.len());
            cut(&mut c_ids, room, false);
            cut(&mut r_ids, room, false);
            if c_ids.is_empty() || r_ids.is_empty() {
                data.dropped += 1;
                continue;
            }
            data.truncated += 1;
        }
        data.pairs.push(PreferencePair { id, prompt: p_ids, chosen: c_ids, rejected: r_ids });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fdpo-data-{}-{k}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("prefs.jsonl");
        std::fs::write(&path, text).unwrap();
        let out = read_preferences(&path, tokenizer, &limits);
        std::fs::remove_dir_all(&dir).unwrap();
        out
    }

    const WIDE: Limits = Limits { max_length: 64, max_prompt_length: 32, truncation: Truncation::KeepEnd };

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
        assert_eq!(p.prompt, tok.encode("the film was", true).unwrap());
        let mut want = tok.encode(" good", false).unwrap();
        want.push(tok.eos_id().unwrap());
        assert_eq!(p.chosen, want, "response without special tokens, EOS appended");
    }

    #[test]
    fn implicit_prompt_is_the_common_prefix() {
        let tok = tokenizer();
        let data = read(r#"{"chosen": "the film was good", "rejected": "the film was bad"}"#, WIDE).unwrap();
        assert_eq!(data.pairs[0].prompt, tok.encode("the film was ", true).unwrap());
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
        let long = "the film was good and the acting was great ".repeat(4);
        let line = serde_json::json!({"prompt": long, "chosen": "good", "rejected": "bad"}).to_string();
        let limits = |truncation| Limits { max_length: 12, max_prompt_length: 8, truncation };
        let tok = tokenizer();
        let full = tok.encode(&long, true).unwrap();
        let end = read(&line, limits(Truncation::KeepEnd)).unwrap();
        assert_eq!((end.truncated, end.dropped), (1, 0));
        assert_eq!(end.pairs[0].prompt, full[full.len() - 8..]);
        let start = read(&line, limits(Truncation::KeepStart)).unwrap();
        assert_eq!(start.pairs[0].prompt, full[..8]);
        assert!(start.pairs[0].prompt.len() + start.pairs[0].chosen.len() <= 12);
        let dropped = read(&line, limits(Truncation::Drop)).unwrap();
        assert_eq!((dropped.pairs.len(), dropped.dropped), (0, 1));
    }

    #[test]
    fn malformed_lines_name_file_line_and_field() {
        let e = read("{\"prompt\": \"p\", \"chosen\": \"a\"}\n", WIDE).unwrap_err().to_string();
        assert!(e.ends_with("prefs.jsonl:1: missing field `rejected`"), "{e}");
        let e = read("\n{\"prompt\": \"p\", \"chosen\": 3, \"rejected\": \"b\"}\n", WIDE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefs.jsonl:2: field `chosen`: expected a string or a list of messages"), "{e}");
        let e = read("{oops}\n", WIDE).unwrap_err().to_string();
        assert!(e.contains("prefs.jsonl:1: invalid JSON"), "{e}");
        let e = read(r#"{"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}"#, WIDE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one is text, the other messages"), "{e}");
    }
}
