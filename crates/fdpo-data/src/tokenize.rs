//! The one tokenisation rule, TRL 1.16's (`DPOTrainer._prepare_dataset`,
//! `SFTTrainer`), used by every command that turns a prompt and responses
//! into token ids: the trainers, the reference cache, `logprobs`,
//! `generate`, `reward score`, `online` and `eval`.
//!
//! 1. The texts. Plain text: the prompt as written, and prompt + response
//!    with the EOS token's text appended to the response (unless it already
//!    ends with it, or the caller scores it as written). Conversational:
//!    the chat template rendered for the prompt with the generation prompt,
//!    and for prompt + response without it; no EOS is appended (the
//!    template ends the turn, e.g. `Yes.<|im_end|>\n`). A plain string
//!    answering a conversational prompt is the assistant's message.
//! 2. The ids. Each text is encoded whole — plain text with the tokenizer's
//!    special tokens (BOS where it adds one), a rendered chat without (the
//!    template places them).
//! 3. The cut. The prompt is the longest common prefix of the prompt's ids
//!    and every full sequence's ids (both responses of a pair, so that they
//!    share one prompt); each response is the rest of its sequence. Where a
//!    token spans the boundary (`"Par" + "is."`), it goes to the response,
//!    as in TRL.
//!
//! An empty prompt under a tokenizer that adds no BOS is an error (the
//! response's first token would have no context), never a silent change.

use fdpo_model::logprobs::{has_context, NO_CONTEXT};
use fdpo_model::{ChatMessage, ModelError, TextTokenizer};

use crate::records::Text;

/// Why a prompt and response could not be tokenised.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The tokenizer or the chat template failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The pair breaks the rule; `field` is the one to fix.
    #[error("field `{field}`: {message}")]
    Field {
        /// `prompt`, or the response's field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A prompt and a response as token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// The prompt's ids.
    pub prompt: Vec<u32>,
    /// The response's ids (EOS or the template's turn end included).
    pub response: Vec<u32>,
}

/// A prompt shared by several responses (a preference pair), as ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedGroup {
    /// The shared prompt's ids.
    pub prompt: Vec<u32>,
    /// Each response's ids, in the order given.
    pub responses: Vec<Vec<u32>>,
    /// Tokens the cut moved from the end of the prompt's own encoding into
    /// the responses (0 unless a token spans the boundary).
    pub prompt_tokens_moved: usize,
}

/// The prompt's ids, as for generation: with special tokens (plain text) or
/// the chat template with the generation prompt (messages).
pub fn tokenize_prompt(tokenizer: &TextTokenizer, prompt: &Text) -> Result<Vec<u32>, ModelError> {
    match prompt {
        Text::Plain(s) => tokenizer.encode(s, true),
        Text::Messages(m) => tokenizer.encode(&tokenizer.apply_chat_template(m, true)?, false),
    }
}

/// Language-modelling text (SFT's `{text}` form): with special tokens and
/// EOS appended, every token learned.
pub fn tokenize_text(tokenizer: &TextTokenizer, text: &str) -> Result<Vec<u32>, ModelError> {
    tokenizer.encode(&with_eos(tokenizer, text, true), true)
}

/// A whole conversation (SFT's `{messages}` form), rendered without the
/// generation prompt, every token learned.
pub fn tokenize_conversation(
    tokenizer: &TextTokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, ModelError> {
    tokenizer.encode(&tokenizer.apply_chat_template(messages, false)?, false)
}

/// `text` with the EOS token's text appended, unless it ends with it.
fn with_eos(tokenizer: &TextTokenizer, text: &str, append: bool) -> String {
    match tokenizer.eos_token() {
        Some(eos) if append && !text.ends_with(eos) => format!("{text}{eos}"),
        _ => text.to_string(),
    }
}

/// Length of the common prefix of two id lists.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `prompt` and each `(field, response)` as ids, by the rule above, the
/// prompt cut where every full sequence leaves it. `append_eos`: append
/// EOS to plain-text responses (TRL's convention; false scores them as
/// written).
pub fn tokenize_group(
    tokenizer: &TextTokenizer,
    prompt: &Text,
    responses: &[(&str, &Text)],
    append_eos: bool,
) -> Result<TokenizedGroup, TokenizeError> {
    let (prompt_ids, full) = match prompt {
        Text::Plain(p) => {
            let mut full = Vec::with_capacity(responses.len());
            for (field, response) in responses {
                let Text::Plain(r) = response else {
                    return Err(TokenizeError::Field {
                        field: field.to_string(),
                        message: "a list of messages answering a plain-text prompt: give the prompt as messages too"
                            .into(),
                    });
                };
                full.push(tokenizer.encode(&format!("{p}{}", with_eos(tokenizer, r, append_eos)), true)?);
            }
            (tokenizer.encode(p, true)?, full)
        }
        Text::Messages(p) => {
            let rendered_prompt = tokenizer.apply_chat_template(p, true)?;
            let mut full = Vec::with_capacity(responses.len());
            for (_, response) in responses {
                let turn = match response {
                    Text::Messages(m) => m.clone(),
                    Text::Plain(r) => vec![ChatMessage { role: "assistant".into(), content: r.clone() }],
                };
                let rendered = tokenizer.apply_chat_template(&[p.as_slice(), &turn].concat(), false)?;
                full.push(tokenizer.encode(&rendered, false)?);
            }
            (tokenizer.encode(&rendered_prompt, false)?, full)
        }
    };
    let cut = full.iter().map(|f| common_prefix(&prompt_ids, f)).min().unwrap_or(prompt_ids.len());
    let responses: Vec<Vec<u32>> = full.into_iter().map(|f| f[cut..].to_vec()).collect();
    let prompt_tokens_moved = prompt_ids.len() - cut;
    let prompt = prompt_ids[..cut].to_vec();
    if responses.iter().any(|r| !has_context(&prompt, r)) {
        return Err(TokenizeError::Field { field: "prompt".into(), message: NO_CONTEXT.into() });
    }
    Ok(TokenizedGroup { prompt, responses, prompt_tokens_moved })
}

/// One prompt and one response (the value of field `field`) as ids.
pub fn tokenize(
    tokenizer: &TextTokenizer,
    prompt: &Text,
    response: &Text,
    field: &str,
    append_eos: bool,
) -> Result<Tokenized, TokenizeError> {
    let mut group = tokenize_group(tokenizer, prompt, &[(field, response)], append_eos)?;
    Ok(Tokenized { prompt: group.prompt, response: group.responses.remove(0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tokenizer(family: &str) -> TextTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures").join(family);
        TextTokenizer::load(&dir).unwrap()
    }

    /// A token that spans the prompt/response boundary goes to the
    /// response, and a pair's two sequences share the shorter prompt.
    #[test]
    fn the_prompt_is_cut_where_every_sequence_leaves_it() {
        let tok = tokenizer("llama");
        let plain = |s: &str| Text::Plain(s.into());
        let g = tokenize_group(
            &tok,
            &plain("the fi"),
            &[("chosen", &plain("lm")), ("rejected", &plain("x"))],
            true,
        )
        .unwrap();
        let whole = tok.encode("the film</s>", true).unwrap();
        assert_eq!(
            [g.prompt.clone(), g.responses[0].clone()].concat(),
            whole,
            "prompt + chosen is the whole text"
        );
        let alone = tok.encode("the fi", true).unwrap();
        assert!(alone.starts_with(&g.prompt));
        assert_eq!(g.prompt_tokens_moved, alone.len() - g.prompt.len());
        // EOS appended once, not twice, and not at all when scoring as written.
        let t = tokenize(&tok, &plain("the film"), &plain(" was good</s>"), "chosen", true).unwrap();
        assert_eq!(t.response.iter().filter(|&&i| Some(i) == tok.eos_id()).count(), 1);
        let t = tokenize(&tok, &plain("the film"), &plain(" was good"), "chosen", false).unwrap();
        assert!(!t.response.contains(&tok.eos_id().unwrap()));
    }

    #[test]
    fn forms_must_agree_and_prompts_need_context() {
        let tok = tokenizer("gpt2");
        let msgs = Text::Messages(vec![ChatMessage { role: "assistant".into(), content: "a".into() }]);
        let e = tokenize(&tok, &Text::Plain("p".into()), &msgs, "chosen", true).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("field `chosen`: a list of messages answering a plain-text prompt"));
        let e = tokenize(&tok, &Text::Plain(String::new()), &Text::Plain("good".into()), "chosen", true);
        assert_eq!(e.unwrap_err().to_string(), format!("field `prompt`: {NO_CONTEXT}"));
    }
}
