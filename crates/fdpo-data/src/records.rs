//! Where a user's rows come from, and the records read from them.
//!
//! A data path is a `.jsonl` file (one JSON object per line), a `.parquet`
//! file (or any file that starts with Parquet's magic bytes), or a Hugging
//! Face dataset folder as it sits in a local snapshot, whose split is found
//! as `data/<split>-*.parquet`, `<split>-*.parquet` or `*/<split>/*.parquet`
//! (then the same names ending in `.jsonl`, or `<split>.jsonl`); shards are
//! read in name order. Every row becomes a JSON object with its
//! [`Location`], and a record type is deserialised from it with serde, so
//! a malformed row is named by file, line or row, and field or column.
//!
//! The records are TRL's dataset forms: [`PreferenceRecord`] (explicit,
//! implicit prompt, conversational), [`SftRecord`] (`prompt`/`completion`,
//! `text`, `messages`), [`UnpairedRecord`] (`prompt`, `completion`,
//! `label`), [`PromptRecord`] (prompts to answer), [`ResponseRecord`] (`fdpo logprobs`), [`SamplesRecord`] (fdpo's samples files) and
//! [`JudgementRecord`] (judge audits). Other fields of a row are ignored
//! (a Hub dataset carries `score_chosen`, `messages`, ...).

use std::fmt;
use std::path::{Path, PathBuf};

use fdpo_model::ChatMessage;
use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::tokenize::TokenizeError;

/// Where a row sits: a JSONL line (1-based) or a Parquet row (0-based, as
/// `datasets` numbers them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (a shard, for a dataset folder).
    pub path: PathBuf,
    /// Line (JSONL, from 1) or row (Parquet, from 0).
    pub index: usize,
    /// Whether `index` is a Parquet row.
    pub parquet: bool,
}

impl Location {
    /// A JSONL line.
    pub fn line(path: &Path, line: usize) -> Location {
        Location { path: path.into(), index: line, parquet: false }
    }

    /// The name of a record without an `id`: `line-N` or `row-N`.
    pub fn default_id(&self) -> String {
        if self.parquet {
            format!("row-{}", self.index)
        } else {
            format!("line-{}", self.index)
        }
    }

    /// What a named value is called in this file: `field` or `column`.
    pub fn noun(&self) -> &'static str {
        if self.parquet {
            "column"
        } else {
            "field"
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.parquet {
            write!(f, "{}: row {}", self.path.display(), self.index)
        } else {
            write!(f, "{}:{}", self.path.display(), self.index)
        }
    }
}

/// What is wrong with a data file; every message names the file.
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
    /// The file as a whole is unusable (not Parquet, truncated, no shard
    /// of the split in a dataset folder).
    #[error("{path}: {message}")]
    File {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// One row is malformed.
    #[error("{at}: {message}")]
    Record {
        /// Where.
        at: Location,
        /// What is wrong, naming the field or column.
        message: String,
    },
    /// A row could not be tokenised.
    #[error("{at}: {source}")]
    Tokenize {
        /// Where.
        at: Location,
        /// Why.
        source: Box<TokenizeError>,
    },
}

impl DataError {
    /// A tokenisation error at `at`.
    pub fn tokenize(at: &Location) -> impl Fn(TokenizeError) -> DataError + '_ {
        move |source| DataError::Tokenize { at: at.clone(), source: Box::new(source) }
    }

    /// A record error at `at`.
    pub fn record(at: &Location, message: impl Into<String>) -> DataError {
        DataError::Record { at: at.clone(), message: message.into() }
    }
}

/// One row: its location and its fields as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Where it is.
    pub at: Location,
    /// Its fields (columns), in file order.
    pub fields: Map<String, Value>,
}

impl Row {
    /// The row as a record `T`; errors name the field (column) and what it
    /// should have been.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, DataError> {
        serde_path_to_error::deserialize(Value::Object(self.fields.clone())).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let noun = self.at.noun();
            let message = match inner.strip_prefix("missing field `") {
                Some(rest) if path == "." => format!("{noun} `{}`: missing", rest.trim_end_matches('`')),
                _ if path == "." => inner,
                _ => format!("{noun} `{path}`: {inner}"),
            };
            DataError::record(&self.at, message)
        })
    }
}

/// The files of a data path for `split`, in reading order.
pub fn data_files(path: &Path, split: &str) -> Result<Vec<PathBuf>, DataError> {
    if !path.is_dir() {
        if !path.exists() {
            let source = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or folder (fdpo reads local data only: a .jsonl, a .parquet or a dataset snapshot folder; nothing is downloaded)",
            );
            return Err(DataError::Io { path: path.into(), source });
        }
        return Ok(vec![path.into()]);
    }
    let list = |dir: &Path, keep: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(keep))
            .collect();
        found.sort();
        found
    };
    for ext in ["parquet", "jsonl"] {
        let shard = |n: &str| n.starts_with(&format!("{split}-")) && n.ends_with(&format!(".{ext}"));
        let whole = |n: &str| n == format!("{split}.{ext}");
        let either = |n: &str| shard(n) || whole(n);
        for dir in [path.join("data"), path.to_path_buf()] {
            let found = list(&dir, &either);
            if !found.is_empty() {
                return Ok(found);
            }
        }
        // `<config>/<split>/*.parquet` (the Hub's Parquet conversion).
        let mut nested: Vec<PathBuf> = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join(split)))
            .filter(|d| d.is_dir())
            .collect();
        nested.sort();
        let found: Vec<PathBuf> =
            nested.iter().flat_map(|d| list(d, &|n: &str| n.ends_with(&format!(".{ext}")))).collect();
        if !found.is_empty() {
            return Ok(found);
        }
    }
    Err(DataError::File {
        path: path.into(),
        message: format!(
            "no `{split}` split in this dataset folder (looked for data/{split}-*.parquet, {split}-*.parquet, */{split}/*.parquet and the same in .jsonl)"
        ),
    })
}

/// Whether a file is Parquet: by its extension or its magic bytes.
fn is_parquet(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "parquet") {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"PAR1"
}

/// Every row of a data path (`split` chooses the split of a dataset
/// folder; `train` is the usual one).
pub fn read_rows(path: &Path, split: &str) -> Result<Vec<Row>, DataError> {
    let mut rows = Vec::new();
    for file in data_files(path, split)? {
        if is_parquet(&file) {
            rows.extend(crate::parquet::read_rows(&file)?);
        } else {
            rows.extend(read_jsonl(&file)?);
        }
    }
    Ok(rows)
}

/// The rows of a JSONL file, one JSON object per non-blank line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    let mut rows = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = Location::line(path, i + 1);
        let line = std::str::from_utf8(line)
            .map_err(|e| DataError::record(&at, format!("not UTF-8 text ({e}); is this a JSONL file?")))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => rows.push(Row { at, fields }),
            Ok(_) => return Err(DataError::record(&at, "expected a JSON object")),
            Err(e) => return Err(DataError::record(&at, format!("invalid JSON: {e}"))),
        }
    }
    Ok(rows)
}

/// Every row of a data path as a record `T`.
pub fn read_records<T: DeserializeOwned>(path: &Path, split: &str) -> Result<Vec<(Location, T)>, DataError> {
    read_rows(path, split)?.into_iter().map(|row| Ok((row.at.clone(), row.parse()?))).collect()
}

/// A prompt or response: plain text, or a list of chat messages (TRL's
/// conversational form).
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    /// A string.
    Plain(String),
    /// `{role, content}` messages.
    Messages(Vec<ChatMessage>),
}

impl Text {
    /// Whether there is nothing but whitespace in it.
    pub fn is_blank(&self) -> bool {
        match self {
            Text::Plain(s) => s.trim().is_empty(),
            Text::Messages(m) => m.iter().all(|x| x.content.trim().is_empty()),
        }
    }

    /// The words a reader sees: the string, or the messages' contents
    /// joined by newlines (for length counts, not for a model).
    pub fn content(&self) -> String {
        match self {
            Text::Plain(s) => s.clone(),
            Text::Messages(m) => m.iter().map(|x| x.content.as_str()).collect::<Vec<_>>().join("\n"),
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of {role, content} messages")
            }

            fn visit_str<E: de::Error>(self, s: &str) -> Result<Text, E> {
                Ok(Text::Plain(s.into()))
            }

            fn visit_string<E: de::Error>(self, s: String) -> Result<Text, E> {
                Ok(Text::Plain(s))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                let mut messages = Vec::new();
                while let Some(m) = seq.next_element::<ChatMessage>()? {
                    messages.push(m);
                }
                Ok(Text::Messages(messages))
            }
        }
        d.deserialize_any(TextVisitor)
    }
}

/// An optional `id`: a string or a number, kept as text.
fn id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(de::Error::custom(format!("expected a string or a number, found {other}"))),
    }
}

/// A preference pair in any of TRL's forms: explicit (`prompt`, `chosen`,
/// `rejected`) or implicit (no `prompt`: it is the common start of
/// `chosen` and `rejected`); each field text or messages.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PreferenceRecord {
    /// `id`, if the row has one.
    #[serde(default, deserialize_with = "id")]
    pub id: Option<String>,
    /// The prompt (absent in the implicit form).
    #[serde(default)]
    pub prompt: Option<Text>,
    /// The preferred response.
    pub chosen: Text,
    /// The other response.
    pub rejected: Text,
}

/// A pair with its prompt made explicit.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The prompt.
    pub prompt: Text,
    /// The preferred response.
    pub chosen: Text,
    /// The other response.
    pub rejected: Text,
}

/// The longest common prefix of two strings, as TRL's `extract_prompt`
/// cuts it: at a character boundary, and a space just before the cut
/// belongs to the responses.
fn common_prefix_len(a: &str, b: &str) -> usize {
    let end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i);
    if end > 0 && a[..end].ends_with(' ') && end < a.len().min(b.len()) {
        end - 1
    } else {
        end
    }
}

impl PreferenceRecord {
    /// The pair with an explicit prompt. Chosen and rejected must be of one
    /// form (both text or both messages), and so must the prompt.
    pub fn pair(self) -> Result<Pair, String> {
        match (self.prompt, self.chosen, self.rejected) {
            (Some(prompt), chosen, rejected) => {
                if matches!(prompt, Text::Plain(_))
                    && (matches!(chosen, Text::Messages(_)) || matches!(rejected, Text::Messages(_)))
                {
                    return Err(
                        "`prompt` is text but a response is a list of messages: give the prompt as messages too"
                            .into(),
                    );
                }
                if matches!(prompt, Text::Messages(_))
                    && (matches!(chosen, Text::Plain(_)) || matches!(rejected, Text::Plain(_)))
                {
                    return Err(
                        "`prompt` is a list of messages but a response is text: give responses as messages too"
                            .into(),
                    );
                }
                Ok(Pair { prompt, chosen, rejected })
            }
            (None, Text::Plain(c), Text::Plain(r)) => {
                let k = common_prefix_len(&c, &r);
                Ok(Pair {
                    prompt: Text::Plain(c[..k].into()),
                    chosen: Text::Plain(c[k..].into()),
                    rejected: Text::Plain(r[k..].into()),
                })
            }
            (None, Text::Messages(c), Text::Messages(r)) => {
                let k = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
                Ok(Pair {
                    prompt: Text::Messages(c[..k].to_vec()),
                    chosen: Text::Messages(c[k..].to_vec()),
                    rejected: Text::Messages(r[k..].to_vec()),
                })
            }
            _ => Err("fields `chosen` and `rejected`: one is text, the other messages".into()),
        }
    }
}

/// An SFT example in one of TRL's forms: `{prompt, completion}` (text or
/// messages), `{text}`, or `{messages}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SftRecord {
    /// `id`, if the row has one.
    #[serde(default, deserialize_with = "id")]
    pub id: Option<String>,
    /// A whole conversation.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// The prompt of the prompt/completion form.
    #[serde(default)]
    pub prompt: Option<Text>,
    /// The completion of the prompt/completion form.
    #[serde(default)]
    pub completion: Option<Text>,
    /// Language-modelling text.
    #[serde(default)]
    pub text: Option<String>,
}

/// An SFT example with its form resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum SftForm {
    /// Prompt and completion (the loss may skip the prompt).
    PromptCompletion {
        /// The prompt.
        prompt: Text,
        /// The completion.
        completion: Text,
    },
    /// A whole conversation (`messages`).
    Conversation(Vec<ChatMessage>),
    /// Plain text (`text`), every token learned.
    Text(String),
}

impl SftRecord {
    /// Which form the row is in; a row with none, or half of one, is an
    /// error naming the missing field.
    pub fn form(self) -> Result<SftForm, String> {
        match (self.messages, self.prompt, self.completion, self.text) {
            (Some(m), _, _, _) => Ok(SftForm::Conversation(m)),
            (None, Some(prompt), Some(completion), _) => Ok(SftForm::PromptCompletion { prompt, completion }),
            (None, Some(_), None, _) => Err("field `completion`: missing".into()),
            (None, None, Some(_), _) => Err("field `prompt`: missing".into()),
            (None, None, None, Some(t)) => Ok(SftForm::Text(t)),
            _ => Err("expected fields `prompt` and `completion`, `text`, or `messages`".into()),
        }
    }
}

/// An unpaired example (TRL's KTO form): a completion marked desirable
/// (`label = true`) or not.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UnpairedRecord {
    /// `id`, if the row has one.
    #[serde(default, deserialize_with = "id")]
    pub id: Option<String>,
    /// The prompt.
    pub prompt: Text,
    /// The completion.
    pub completion: Text,
    /// Desirable or not.
    pub label: bool,
}

/// A prompt to answer (`fdpo generate`, `fdpo online`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PromptRecord {
    /// The prompt.
    pub prompt: Text,
}

/// One response to score (`fdpo logprobs`): a prompt and a response.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ResponseRecord {
    /// The prompt.
    pub prompt: Text,
    /// The response.
    pub response: Text,
}

/// A line of a samples file: a prompt and the responses sampled for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SamplesRecord {
    /// The prompt.
    pub prompt: Text,
    /// The responses, in sampling order.
    pub responses: Vec<String>,
}

/// A line of a judgement file (`fdpo audit judge`): the judge's verdict on
/// two responses, optionally with the responses swapped and a reference
/// verdict.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JudgementRecord {
    /// The first response.
    pub a: Text,
    /// The second response.
    pub b: Text,
    /// `a`, `b` or `tie`.
    pub winner: String,
    /// The verdict with `a` and `b` swapped (in the original labels).
    #[serde(default)]
    pub swapped_winner: Option<String>,
    /// A reference (human) verdict.
    #[serde(default)]
    pub reference: Option<String>,
    /// The judge's name.
    #[serde(default)]
    pub judge: Option<String>,
    /// The model that wrote `a`.
    #[serde(default)]
    pub a_model: Option<String>,
    /// The model that wrote `b`.
    #[serde(default)]
    pub b_model: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(json: &str) -> Row {
        let Value::Object(fields) = serde_json::from_str(json).unwrap() else { panic!() };
        Row { at: Location::line(Path::new("prefs.jsonl"), 3), fields }
    }

    #[test]
    fn field_errors_name_the_line_and_field() {
        let e = row(r#"{"prompt": "p", "chosen": "a"}"#).parse::<PreferenceRecord>().unwrap_err();
        assert_eq!(e.to_string(), "prefs.jsonl:3: field `rejected`: missing");
        let e = row(r#"{"prompt": "p", "chosen": null, "rejected": "b"}"#)
            .parse::<PreferenceRecord>()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "prefs.jsonl:3: field `chosen`: invalid type: null, expected a string or a list of {role, content} messages"
        );
        let e = row(r#"{"chosen": [{"role": "user"}], "rejected": "b"}"#).parse::<PreferenceRecord>();
        assert!(e.unwrap_err().to_string().contains("field `chosen[0]`: missing field `content`"));
        let e = row(r#"{"prompt": "p", "completion": "c", "label": "yes"}"#).parse::<UnpairedRecord>();
        assert_eq!(
            e.unwrap_err().to_string(),
            "prefs.jsonl:3: field `label`: invalid type: string \"yes\", expected a boolean"
        );
    }

    /// TRL's `extract_prompt`: the space before the first difference goes
    /// with the responses; messages split at the first differing message.
    #[test]
    fn implicit_prompts_are_extracted_as_trl_does() {
        let r: PreferenceRecord =
            row(r#"{"chosen": "the film was good", "rejected": "the film was bad"}"#).parse().unwrap();
        let p = r.pair().unwrap();
        assert_eq!(p.prompt, Text::Plain("the film was".into()));
        assert_eq!((p.chosen, p.rejected), (Text::Plain(" good".into()), Text::Plain(" bad".into())));
        let r: PreferenceRecord =
            row(r#"{"chosen": "café au lait", "rejected": "café noir"}"#).parse().unwrap();
        assert_eq!(r.pair().unwrap().prompt, Text::Plain("café".into()));
        let m = |role: &str, c: &str| serde_json::json!({"role": role, "content": c});
        let line = serde_json::json!({
            "chosen": [m("user", "hi"), m("assistant", "good")],
            "rejected": [m("user", "hi"), m("assistant", "bad")],
        });
        let r: PreferenceRecord = row(&line.to_string()).parse().unwrap();
        let p = r.pair().unwrap();
        assert!(matches!(&p.prompt, Text::Messages(v) if v.len() == 1 && v[0].content == "hi"));
        assert!(matches!(&p.rejected, Text::Messages(v) if v[0].content == "bad"));
        let mixed: PreferenceRecord =
            row(r#"{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#)
                .parse()
                .unwrap();
        assert!(mixed.pair().unwrap_err().contains("`prompt` is text"));
    }

    #[test]
    fn sft_forms_and_ids() {
        let f = |json: &str| row(json).parse::<SftRecord>().unwrap().form();
        assert!(matches!(f(r#"{"text": "t"}"#), Ok(SftForm::Text(t)) if t == "t"));
        assert!(matches!(f(r#"{"prompt": "p", "completion": "c"}"#), Ok(SftForm::PromptCompletion { .. })));
        assert_eq!(f(r#"{"prompt": "p"}"#).unwrap_err(), "field `completion`: missing");
        assert!(f(r#"{"other": 1}"#).unwrap_err().contains("expected fields"));
        let r: SftRecord = row(r#"{"id": 7, "text": "t"}"#).parse().unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        std::fs::write(&path, b"{\"a\": 1}\n\n[1]\n").unwrap();
        let e = read_jsonl(&path).unwrap_err().to_string();
        assert!(e.ends_with("x.jsonl:3: expected a JSON object"), "{e}");
        std::fs::write(&path, b"{\"a\": 1}\n{\"a\": \"\xff\"}\n").unwrap();
        let e = read_jsonl(&path).unwrap_err().to_string();
        assert!(e.contains("x.jsonl:2: not UTF-8 text"), "{e}");
        std::fs::write(&path, b"{\"a\": 1}\n{oops\n").unwrap();
        assert!(read_jsonl(&path).unwrap_err().to_string().contains("x.jsonl:2: invalid JSON"));
    }

    #[test]
    fn dataset_folders_find_their_split() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        for name in
            ["train-00001-of-00002.jsonl", "train-00000-of-00002.jsonl", "train_prefs-00000-of-00001.jsonl"]
        {
            std::fs::write(data.join(name), format!("{{\"name\": \"{name}\"}}\n")).unwrap();
        }
        let names: Vec<String> = read_rows(dir.path(), "train")
            .unwrap()
            .iter()
            .map(|r| r.fields["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl"], "shards in order");
        assert_eq!(read_rows(dir.path(), "train_prefs").unwrap().len(), 1);
        let e = read_rows(dir.path(), "test").unwrap_err().to_string();
        assert!(e.contains("no `test` split in this dataset folder"), "{e}");
        let nested = dir.path().join("default/test");
        std::fs::create_dir_all(&nested).unwrap();
        std::fs::write(nested.join("0000.jsonl"), "{\"name\": \"n\"}\n").unwrap();
        assert_eq!(read_rows(dir.path(), "test").unwrap().len(), 1);
    }
}
