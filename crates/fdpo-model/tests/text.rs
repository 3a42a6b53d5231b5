//! Tokenizers, chat templates, sequence log-probabilities and greedy
//! generation against transformers (expected.json, written by
//! tests/fixtures/make_fixtures.py with transformers 5.24 / tokenizers 0.23).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use fdpo_model::logprobs::sequence_logprobs;
use fdpo_model::sample::{generate, SamplingConfig};
use fdpo_model::{CausalLm, ChatMessage, TextTokenizer};
use serde_json::Value;

const FAMILIES: [&str; 3] = ["llama", "qwen2", "gpt2"];

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(family)
}

fn expected(family: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(family).join("expected.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_ids_match_python() {
    for family in FAMILIES {
        let tok = TextTokenizer::load(&fixture(family)).unwrap();
        for case in expected(family)["texts"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "{family}: {text:?}");
        }
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    for family in FAMILIES {
        let tok = TextTokenizer::load(&fixture(family)).unwrap();
        let want = &expected(family)["chat"];
        let messages: Vec<ChatMessage> = serde_json::from_value(want["messages"].clone()).unwrap();
        let got = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(got, want["rendered"].as_str().unwrap(), "{family}");
        // Without the generation prompt the assistant tag is absent.
        assert!(!tok.apply_chat_template(&messages, false).unwrap().ends_with("<|assistant|>"));
    }
}

#[test]
fn sequence_logprobs_match_transformers() {
    for family in FAMILIES {
        let dir = fixture(family);
        let tok = TextTokenizer::load(&dir).unwrap();
        let (model, _) = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let cases = expected(family)["pairs"].as_array().unwrap().clone();
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = cases
            .iter()
            .map(|c| {
                // The convention: prompt with special tokens, response without, joined.
                let p = tok.encode(c["prompt"].as_str().unwrap(), true).unwrap();
                let r = tok.encode(c["response"].as_str().unwrap(), false).unwrap();
                assert_eq!((&p, &r), (&ids(&c["prompt_ids"]), &ids(&c["response_ids"])), "{family}");
                (p, r)
            })
            .collect();
        // One padded batch for all pairs must agree with transformers' unpadded runs.
        let got = sequence_logprobs(&model, &pairs, tok.pad_id(), &Device::Cpu).unwrap();
        for (g, c) in got.iter().zip(&cases) {
            let want = c["logprob"].as_f64().unwrap();
            assert!((g.logprob_sum - want).abs() < 1e-4, "{family}: {} vs {want}", g.logprob_sum);
            assert_eq!(g.tokens, c["response_ids"].as_array().unwrap().len());
            let want_h = c["entropy"].as_f64().unwrap();
            assert!(
                (g.entropy_mean - want_h).abs() < 1e-4,
                "{family}: entropy {} vs {want_h}",
                g.entropy_mean
            );
            assert!((g.logprob_mean * g.tokens as f64 - g.logprob_sum).abs() < 1e-9);
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for family in FAMILIES {
        let dir = fixture(family);
        let (model, _) = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let want = &expected(family)["greedy"];
        let prompt = ids(&want["prompt_ids"]);
        let output = ids(&want["output_ids"]);
        let cfg = SamplingConfig { max_new_tokens: 10, temperature: 0.0, ..Default::default() };
        let got = generate(&model, &prompt, 2, &[], &cfg, &Device::Cpu).unwrap();
        assert_eq!(got[0], output[prompt.len()..], "{family}");
        assert_eq!(got[0], got[1], "{family}: greedy samples agree");
    }
}

/// Sampling is seeded: same seed, same samples; K samples differ.
#[test]
fn sampling_is_seeded() {
    let dir = fixture("llama");
    let tok = TextTokenizer::load(&dir).unwrap();
    let (model, _) = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let prompt = tok.encode("the film", true).unwrap();
    let cfg =
        SamplingConfig { max_new_tokens: 8, temperature: 1.0, top_k: Some(50), top_p: Some(0.95), seed: 3 };
    let eos: Vec<u32> = tok.eos_id().into_iter().collect();
    let a = generate(&model, &prompt, 4, &eos, &cfg, &Device::Cpu).unwrap();
    let b = generate(&model, &prompt, 4, &eos, &cfg, &Device::Cpu).unwrap();
    assert_eq!(a, b);
    assert!(a.iter().any(|s| s != &a[0]), "{a:?}");
}

/// Prompts of different lengths in one left-padded batch give what each
/// gives alone (greedy and seeded sampling), for every family.
#[test]
fn batched_prompts_match_one_at_a_time() {
    use fdpo_model::sample::generate_batch;
    for family in FAMILIES {
        let dir = fixture(family);
        let tok = TextTokenizer::load(&dir).unwrap();
        let (model, _) = CausalLm::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let prompts: Vec<Vec<u32>> = ["the film", "a very good story, really", "not bad"]
            .iter()
            .map(|p| tok.encode(p, true).unwrap())
            .collect();
        for temperature in [0.0, 1.0] {
            let cfg = SamplingConfig { max_new_tokens: 6, temperature, seed: 5, ..Default::default() };
            let batched = generate_batch(&model, &prompts, 0, 2, &[], &cfg, &Device::Cpu).unwrap();
            for (i, p) in prompts.iter().enumerate() {
                let alone =
                    generate_batch(&model, std::slice::from_ref(p), i, 2, &[], &cfg, &Device::Cpu).unwrap();
                assert_eq!(batched[i], alone[0], "{family} prompt {i} T={temperature}");
            }
        }
    }
}

#[test]
fn eos_ids_come_from_generation_config_and_tokenizer() {
    let dir = fixture("llama");
    let tok = TextTokenizer::load(&dir).unwrap();
    let ids = fdpo_model::sample::eos_ids(&dir, tok.eos_id()).unwrap();
    assert_eq!(ids, vec![2]);
}
