//! Sentence embeddings: a tiny random BERT committed as a fixture (against
//! transformers with mean pooling and L2 norm), and all-MiniLM-L6-v2 as
//! installed by `scripts/setup-encoders.sh`, which the README's test
//! command runs first (against sentence-transformers 6.2's `encode`).
//! NLI heads against transformers. Expected values:
//! tests/fixtures/make_bert_fixture.py (transformers 5.24).

use std::path::{Path, PathBuf};

use candle_core::Device;
use fdpo_model::encoder::{default_encoder_dir, embedding_diversity, SentenceEncoder};
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap()).unwrap()
}

fn check(encoder: &SentenceEncoder, want: &Value, sentences: &[String], tol: f64) {
    let got = encoder.embed(sentences).unwrap();
    for (i, row) in want["first8"].as_array().unwrap().iter().enumerate() {
        for (j, x) in row.as_array().unwrap().iter().enumerate() {
            let (g, w) = (got[i][j] as f64, x.as_f64().unwrap());
            assert!((g - w).abs() < tol, "embedding[{i}][{j}]: {g} vs {w}");
        }
    }
    let cos = want["cosine"].as_array().unwrap();
    for i in 0..sentences.len() {
        for j in 0..sentences.len() {
            let g: f64 = got[i].iter().zip(&got[j]).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
            let w = cos[i][j].as_f64().unwrap();
            assert!((g - w).abs() < tol, "cosine[{i}][{j}]: {g} vs {w}");
        }
    }
    // Diversity is 1 − the mean of the off-diagonal cosines.
    let n = sentences.len();
    let mean: f64 = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .map(|(i, j)| cos[i][j].as_f64().unwrap())
        .sum::<f64>()
        / (n * (n - 1) / 2) as f64;
    assert!((embedding_diversity(&got) - (1.0 - mean)).abs() < tol);
}

fn sentences() -> Vec<String> {
    expected()["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn tiny_bert_embeddings_match_transformers() {
    let encoder = SentenceEncoder::load(&fixture(), &Device::Cpu).unwrap();
    check(&encoder, &expected()["tiny"], &sentences(), 1e-5);
}

/// The real default encoder (installed by the README's test command; when
/// `cargo test` runs without that step, this test says so and passes).
#[test]
fn all_minilm_l6_v2_embeddings_match_transformers() {
    let dir = default_encoder_dir();
    if !dir.join("model.safetensors").exists() {
        eprintln!("note: {} not installed (scripts/setup-encoders.sh); skipped", dir.display());
        return;
    }
    let encoder = SentenceEncoder::load(&dir, &Device::Cpu).unwrap();
    check(&encoder, &expected()["all-MiniLM-L6-v2"], &sentences(), 1e-5);
}

#[test]
fn embedding_diversity_of_copies_is_zero_and_of_opposites_is_two() {
    let a = vec![0.6f32, 0.8];
    // f32 inputs: 0.6² + 0.8² is 1 to ~1e-7.
    assert!(embedding_diversity(&[a.clone(), a.clone()]).abs() < 1e-6);
    assert!((embedding_diversity(&[a.clone(), a.iter().map(|x| -x).collect()]) - 2.0).abs() < 1e-6);
    assert_eq!(embedding_diversity(&[a]), 0.0);
}

/// BERT and RoBERTa NLI heads: class probabilities on every ordered pair and
/// the NLI diversity (mean of P(contradiction) − P(entailment)) match
/// transformers' BertForSequenceClassification / RobertaForSequenceClassification.
#[test]
fn nli_classifiers_match_transformers() {
    use fdpo_model::bert::NliClassifier;
    for kind in ["bert", "roberta"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/nli-{kind}"));
        let want: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let nli = NliClassifier::load(&dir, &Device::Cpu).unwrap();
        assert_eq!((nli.labels.contradiction, nli.labels.neutral, nli.labels.entailment), (0, 1, 2));
        let pairs: Vec<(String, String)> = want["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
            .collect();
        let got = nli.probabilities(&pairs).unwrap();
        for (g, w) in got.iter().zip(want["probabilities"].as_array().unwrap()) {
            for (a, b) in g.iter().zip(w.as_array().unwrap()) {
                assert!((*a as f64 - b.as_f64().unwrap()).abs() < 1e-5, "{kind}: {g:?} vs {w}");
            }
        }
        let d = nli.diversity(&sentences()).unwrap();
        assert!(
            (d - want["diversity"].as_f64().unwrap()).abs() < 1e-5,
            "{kind}: {d} vs {}",
            want["diversity"]
        );
    }
}

#[test]
fn nli_model_without_labels_is_refused() {
    use fdpo_model::bert::NliClassifier;
    let err = NliClassifier::load(&fixture(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("id2label"), "{err}");
}

/// The aggregation by hand, with labels in another order (as some MNLI
/// checkpoints have: entailment first).
#[test]
fn nli_aggregation_by_hand() {
    use fdpo_model::bert::{aggregate_nli, NliLabels};
    let labels = NliLabels { contradiction: 2, neutral: 1, entailment: 0 };
    let probs = vec![vec![0.1f32, 0.1, 0.8], vec![0.5, 0.5, 0.0], vec![0.2, 0.6, 0.2]];
    // (0.8 − 0.1) + (0 − 0.5) + (0.2 − 0.2) = 0.2, over 3 pairs.
    assert!((aggregate_nli(&probs, labels) - 0.2 / 3.0).abs() < 1e-7);
    assert_eq!(aggregate_nli(&[], labels), 0.0);
}
