//! Tokenizers and chat templates of a model directory: tokenizer.json (the
//! `tokenizers` crate, ids identical to Python's), special tokens from
//! tokenizer_config.json, and the chat template from tokenizer_config.json's
//! `chat_template` or the `chat_template.jinja` file that transformers ≥ 5
//! writes, rendered with minijinja.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::ModelError;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A model's tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    chat_template: Option<String>,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads tokenizer.json (required), tokenizer_config.json and
    /// chat_template.jinja (optional) from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        // As transformers does, padding and truncation are chosen per call,
        // not by tokenizer.json (all-MiniLM-L6-v2's pads every text to 128).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer { path: path.clone(), message: e.to_string() })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| ModelError::Tokenizer { path: config_path.clone(), message: e.to_string() })?
        } else {
            Value::Null
        };
        let template_in_config = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(String::from),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        let chat_template = match template_in_config {
            Some(t) => Some(t),
            None if jinja.exists() => {
                Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
            }
            None => None,
        };
        Ok(TextTokenizer {
            inner,
            path: dir.to_path_buf(),
            bos_token: token_string(config.get("bos_token")),
            eos_token: token_string(config.get("eos_token")),
            pad_token: token_string(config.get("pad_token")),
            chat_template,
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's
    /// post-processor (e.g. Llama's BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Ids and token-type ids of a text pair with the special tokens of the
    /// tokenizer's pair template (e.g. `[CLS] a [SEP] b [SEP]`).
    pub fn encode_pair(&self, a: &str, b: &str) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        let enc = self
            .inner
            .encode((a, b), true)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), message: e.to_string() })?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), message: e.to_string() })
    }

    fn id_of(&self, token: &Option<String>) -> Option<u32> {
        token.as_deref().and_then(|t| self.inner.token_to_id(t))
    }

    /// The EOS token's text (e.g. `</s>`, `<|im_end|>`), if the tokenizer has one.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The end-of-sequence id, if the tokenizer has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.id_of(&self.eos_token)
    }

    /// The padding id: `pad_token`, else EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.id_of(&self.pad_token).or(self.eos_id()).unwrap_or(0)
    }

    /// The vocabulary size, with added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the model directory has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template, as transformers'
    /// `apply_chat_template(tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self.chat_template.as_deref().ok_or_else(|| ModelError::Template {
            path: self.path.clone(),
            message: "the tokenizer has no chat_template".into(),
        })?;
        let template_err =
            |e: minijinja::Error| ModelError::Template { path: self.path.clone(), message: e.to_string() };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string methods (.strip(), .startswith(), ...) that HF templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template).map_err(template_err)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            pad_token => self.pad_token.clone().unwrap_or_default(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(template_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Templates written for Jinja in Python: string methods, tojson, loop
    /// controls, raise_exception.
    #[test]
    fn python_style_templates_render() {
        let dir = std::env::temp_dir().join(format!("fdpo-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tokenizer.json");
        std::fs::copy(fixture, dir.join("tokenizer.json")).unwrap();
        let template = "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}\
            [{{ m['role'].upper() }}]{{ m['content'].strip() }}{{ m | tojson }}{% endfor %}\
            {% if messages[0]['content'].startswith('boom') %}{{ raise_exception('no boom') }}{% endif %}";
        let config = serde_json::json!({"eos_token": {"content": "</s>"}, "chat_template": template});
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let tok = TextTokenizer::load(&dir).unwrap();
        let msg = |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into() };
        let out = tok.apply_chat_template(&[msg("system", "s"), msg("user", "  hi  ")], false).unwrap();
        // transformers' tojson keeps the message's key order (sort_keys=False).
        assert_eq!(out, r#"[USER]hi{"role":"user","content":"  hi  "}"#);
        let err = tok.apply_chat_template(&[msg("user", "boom")], false).unwrap_err().to_string();
        assert!(err.contains("no boom"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
