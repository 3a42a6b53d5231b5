//! distinct-n, EAD and self-BLEU against an independent implementation:
//! tests/fixtures/diversity_reference.py (distinct/EAD written in Python,
//! self-BLEU from NLTK's sentence_bleu with smoothing method 1).

use fdpo_core::diversity::{distinct_n, ead, self_bleu};
use serde_json::Value;

#[test]
fn metrics_match_the_python_reference() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/diversity_reference.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let v = reference["vocab_size"].as_u64().unwrap() as usize;
    for set in reference["sets"].as_array().unwrap() {
        let texts: Vec<Vec<&str>> = set["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().split_whitespace().collect())
            .collect();
        for (n, want) in set["distinct"].as_array().unwrap().iter().enumerate() {
            assert!((distinct_n(&texts, n + 1) - want.as_f64().unwrap()).abs() < 1e-12, "distinct-{}", n + 1);
        }
        let e = ead(&texts, v);
        assert!((e - set["ead"].as_f64().unwrap()).abs() < 1e-9 * e.max(1.0), "ead {e} vs {}", set["ead"]);
        let b = self_bleu(&texts);
        assert!(
            (b - set["self_bleu"].as_f64().unwrap()).abs() < 1e-12,
            "self-BLEU {b} vs {}",
            set["self_bleu"]
        );
    }
}
