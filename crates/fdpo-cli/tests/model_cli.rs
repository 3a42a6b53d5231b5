//! End-to-end tests of `fdpo logprobs` and `fdpo generate` on fdpo-model's
//! fixtures, against the numbers transformers produced for them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fdpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fdpo")).args(args).output().expect("the fdpo binary runs")
}

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures").join(family)
}

fn expected(family: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(family).join("expected.json")).unwrap()).unwrap()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn logprobs_of_responses_and_pairs_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let want = expected("llama");
    let pairs = want["pairs"].as_array().unwrap();
    let mut data = String::new();
    for p in pairs {
        data.push_str(
            &serde_json::json!({"id": 7, "prompt": p["prompt"], "response": p["response"]}).to_string(),
        );
        data.push('\n');
    }
    // One preference line: chosen = pair 0's response, rejected = pair 1's, on pair 0's prompt.
    data.push_str(
        &serde_json::json!({"prompt": pairs[0]["prompt"], "chosen": pairs[0]["response"], "rejected": pairs[0]["response"]})
            .to_string(),
    );
    data.push('\n');
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, data).unwrap();
    let out = dir.path().join("out.jsonl");
    let model = fixture("llama");
    let res = fdpo(&[
        "logprobs",
        "--model",
        model.to_str().unwrap(),
        "--data",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "2",
        // transformers' numbers are of the responses as written.
        "--no-eos",
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let rows = lines(&out);
    assert_eq!(rows.len(), pairs.len() + 1);
    for (row, p) in rows.iter().zip(pairs) {
        assert_eq!(row["id"], 7, "input fields are kept");
        let got = row["logprob"].as_f64().unwrap();
        assert!((got - p["logprob"].as_f64().unwrap()).abs() < 1e-4, "{row}");
        assert_eq!(row["tokens"].as_u64().unwrap() as usize, p["response_ids"].as_array().unwrap().len());
    }
    let pref = rows.last().unwrap();
    let w = pairs[0]["logprob"].as_f64().unwrap();
    assert!((pref["chosen_logprob"].as_f64().unwrap() - w).abs() < 1e-4, "{pref}");
    assert!((pref["rejected_logprob"].as_f64().unwrap() - w).abs() < 1e-4, "{pref}");
    assert!(pref.get("chosen_tokens").is_some() && pref.get("rejected_tokens").is_some());
}

#[test]
fn logprobs_errors_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("gpt2");
    let run = |body: &str| {
        let input = dir.path().join("bad.jsonl");
        std::fs::write(&input, body).unwrap();
        let out = dir.path().join("o.jsonl");
        let res = fdpo(&[
            "logprobs",
            "--model",
            model.to_str().unwrap(),
            "--data",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(res.status.code(), Some(1));
        String::from_utf8_lossy(&res.stderr).into_owned()
    };
    assert!(run("{\"prompt\": \"a\", \"response\": \"b\"}\n{oops\n").contains("bad.jsonl:2: invalid JSON"));
    assert!(run("{\"prompt\": \"a\"}\n").contains("bad.jsonl:1: field `response`: missing"));
    assert!(run("{\"prompt\": 3, \"response\": \"b\"}\n").contains("bad.jsonl:1: field `prompt`"));
    let long = "the film was good ".repeat(40);
    let err = run(&format!("{{\"prompt\": \"{long}\", \"response\": \"b\"}}\n"));
    assert!(err.contains("longer than the model's 64"), "{err}");
    // GPT-2 adds no BOS: an empty prompt leaves the response's first token
    // without context (it used to be dropped silently: 8 tokens of 9).
    let err =
        run("{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"\", \"response\": \"hello world\"}\n");
    assert!(
        err.contains("bad.jsonl:2: field `prompt`: prompt is empty and the tokenizer adds no BOS token"),
        "{err}"
    );
    // Both forms on one line (the pair form used to win silently).
    let err = run("{\"prompt\": \"a\", \"response\": \"b\", \"chosen\": \"c\", \"rejected\": \"d\"}\n");
    assert!(
        err.contains("bad.jsonl:1: fields `response`, `chosen`, `rejected`: give either `response` or `chosen` and `rejected`, not both"),
        "{err}"
    );
}

#[test]
fn greedy_generate_writes_transformers_continuation() {
    let dir = tempfile::tempdir().unwrap();
    let want = expected("qwen2");
    let model = fixture("qwen2");
    let prompts = dir.path().join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"the film\"}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let out = dir.path().join("s.jsonl");
    let res = fdpo(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--samples",
        "3",
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let rows = lines(&out);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["prompt"], "the film");
    let responses = rows[0]["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 3);
    assert!(responses.iter().all(|r| r == &responses[0]), "greedy samples agree");
    // transformers' greedy continuation, up to EOS, decoded by the same tokenizer.
    let prompt_len = want["greedy"]["prompt_ids"].as_array().unwrap().len();
    let eos = 2;
    let new: Vec<u32> = want["greedy"]["output_ids"].as_array().unwrap()[prompt_len..]
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .take_while(|&t| t != eos)
        .collect();
    let tok = fdpo_model::TextTokenizer::load(&model).unwrap();
    assert_eq!(responses[0].as_str().unwrap(), tok.decode(&new, true).unwrap());
    // An ensemble of the model with itself is the model: the same greedy text.
    let ens = dir.path().join("e.jsonl");
    let res = fdpo(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--ensemble",
        model.to_str().unwrap(),
        "--weights",
        "0.25,0.75",
        "--prompts",
        prompts.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
        "--out",
        ens.to_str().unwrap(),
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert_eq!(lines(&ens)[0]["responses"][0], responses[0]);
}

/// Smoke test: the benchmark runs on a tiny config and reports its fields
/// (its figures are read by people, not asserted).
#[test]
fn smoke_bench_train_json() {
    for arch in ["llama", "gpt2"] {
        let out = fdpo(&[
            "bench",
            "train",
            "--arch",
            arch,
            "--vocab",
            "64",
            "--hidden",
            "16",
            "--layers",
            "1",
            "--heads",
            "2",
            "--intermediate",
            "32",
            "--batch",
            "2",
            "--seq",
            "8",
            "--steps",
            "1",
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0 && v["peak_rss_bytes"].as_u64().unwrap() > 0);
        assert_eq!(v["arch"], arch);
    }
}

/// `fdpo bench dpo --lengths` writes the pairs it draws, and its step's
/// tokens are Σ (P + C) + (P + R) over the timed steps' pairs (steps 2..,
/// after two warm-up steps), whatever the layout; a Qwen2 shape with
/// grouped queries runs too.
#[test]
fn bench_dpo_counts_the_tokens_of_the_pairs_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lengths.json");
    let tiny = ["--vocab", "64", "--hidden", "16", "--layers", "1", "--heads", "4", "--intermediate", "32"];
    for (layout, arch) in [("shared", "llama"), ("padded", "llama"), ("packed", "qwen2")] {
        let rest =
            ["--kv-heads", "2", "--batch", "3", "--seq", "300", "--steps", "2", "--json", "--lengths", "hh"];
        let args = [&["bench", "dpo", "--arch", arch, "--layout", layout][..], &tiny, &rest].concat();
        let out = fdpo(&[&args[..], &["--write-lengths", file.to_str().unwrap()]].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let lengths: Vec<[usize; 3]> =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(lengths.len(), 3 * 4);
        let timed: usize = lengths[6..].iter().map(|[p, c, r]| 2 * p + c + r).sum();
        assert_eq!(v["tokens_per_step"].as_f64().unwrap(), timed as f64 / 2.0, "{layout}");
        assert_eq!((v["layout"].as_str(), v["lengths"].as_str()), (Some(layout), Some("hh")));
    }
}

/// `fdpo bench gemm --shape` times the product it names: the JSON echoes
/// M, K and N, and `--size` alone still means a square product.
#[test]
fn bench_gemm_reports_its_shape() {
    for (args, mkn) in [(&["--shape", "3x5x7"][..], [3, 5, 7]), (&["--size", "6"][..], [6, 6, 6])] {
        let out = fdpo(&[&["bench", "gemm", "--steps", "1", "--threads", "1", "--json"][..], args].concat());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let got: Vec<u64> = ["m", "k", "n"].iter().map(|d| v[*d].as_u64().unwrap()).collect();
        assert_eq!(got, mkn);
        assert!(v["gflops"].as_f64().unwrap() > 0.0);
    }
}

/// Sizes no model can have are refused by flag, not by a panic.
#[test]
fn bench_refuses_impossible_sizes() {
    for (args, flag) in [
        (&["train", "--hidden", "0"][..], "--hidden"),
        (&["train", "--heads", "0"][..], "--heads"),
        (&["dpo", "--batch", "0"][..], "--batch"),
        (&["generate", "--vocab", "0"][..], "--vocab"),
        (&["train", "--steps", "0"][..], "--steps"),
        (&["train", "--seq", "1"][..], "--seq"),
        (&["train", "--hidden", "250", "--heads", "8"][..], "multiple of --heads"),
        (&["train", "--hidden", "24", "--heads", "8"][..], "must be even"),
        (&["train", "--heads", "8", "--kv-heads", "3"][..], "--kv-heads"),
        (&["gemm", "--size", "0"][..], "--size"),
        (&["gemm", "--shape", "64x64"][..], "--shape"),
        (&["gemm", "--shape", "64x0x64"][..], "--shape"),
    ] {
        let out = fdpo(&[&["bench"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// `fdpo eval diversity` on two hand-made samples files: numbers checked
/// against the definitions (distinct-1 by hand; self-BLEU of copies of
/// 4-word texts is 1 — shorter ones have no 4-grams and NLTK smooths them).
#[test]
fn eval_diversity_compares_files() {
    let dir = tempfile::tempdir().unwrap();
    let same = dir.path().join("sft.jsonl");
    std::fs::write(
        &same,
        "{\"prompt\": \"p\", \"responses\": [\"a b c g\", \"a b c g\"]}\n{\"prompt\": \"q\", \"responses\": [\"d e f h\", \"d e f h\"]}\n",
    )
    .unwrap();
    let varied = dir.path().join("dpo.jsonl");
    std::fs::write(&varied, "{\"prompt\": \"p\", \"responses\": [\"a b c g\", \"x y z w\"]}\n").unwrap();
    let out_dir = dir.path().join("div");
    let tiny_bert = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures/bert");
    let out = fdpo(&[
        "eval",
        "diversity",
        same.to_str().unwrap(),
        varied.to_str().unwrap(),
        "--output-dir",
        out_dir.to_str().unwrap(),
        "--json",
        "--embedder",
        tiny_bert.to_str().unwrap(),
        "--nli",
        tiny_bert.with_file_name("nli-roberta").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let metric = |file: usize, name: &str| -> Value {
        v["files"][file]["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == name).unwrap().clone()
    };
    assert_eq!(metric(0, "distinct-1")["per_input_mean"], 0.5);
    assert_eq!(metric(1, "distinct-1")["per_input_mean"], 1.0);
    assert!(metric(0, "1-self-bleu")["per_input_mean"].as_f64().unwrap().abs() < 1e-12);
    assert_eq!(v["vocab_size"], 50257);
    // Copies embed identically: embedding diversity 0 within prompts of the first file.
    assert!(metric(0, "embedding")["per_input_mean"].as_f64().unwrap().abs() < 1e-6);
    assert!(metric(1, "embedding")["per_input_mean"].as_f64().unwrap() > 1e-3);
    // NLI diversity lies in [−1, 1] and is the same for a prompt's identical copies (ordered pairs alike).
    let nli = metric(0, "nli")["per_input_mean"].as_f64().unwrap();
    assert!((-1.0..=1.0).contains(&nli), "{nli}");
    for f in ["diversity.json", "diversity.svg", "diversity.png"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    // A malformed line names file, line and field.
    std::fs::write(&varied, "{\"prompt\": \"p\", \"responses\": [\"a\", 3]}\n").unwrap();
    let out =
        fdpo(&["eval", "diversity", varied.to_str().unwrap(), "--output-dir", out_dir.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("dpo.jsonl:1: field `responses[1]`"), "{err}");
}

/// A prompt with one response has no self-BLEU: it is left out of the
/// per-input mean (not counted as diversity 1), the JSON counts the
/// prompts kept and stderr says how many were left out and why.
#[test]
fn eval_diversity_leaves_out_undefined_prompts_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k1.jsonl");
    std::fs::write(&file, "{\"prompt\": \"p\", \"responses\": [\"a b\", \"a b\"]}\n{\"prompt\": \"q\", \"responses\": [\"c d\"]}\n").unwrap();
    let out_dir = dir.path().join("div");
    let out = fdpo(&[
        "eval",
        "diversity",
        file.to_str().unwrap(),
        "--no-embedding",
        "--json",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bleu =
        v["files"][0]["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "1-self-bleu").unwrap();
    assert_eq!(bleu["prompts_counted"], 1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("k1.jsonl: 1-self-bleu: 1 of 2 prompts left out of the per-input mean and std (fewer than 2 responses)"),
        "{stderr}"
    );
    assert!(stderr.contains("k1.jsonl: distinct-3: 2 of 2 prompts left out"), "{stderr}");
    assert!(!stderr.contains("distinct-2:"), "{stderr}");
}

/// `fdpo audit verbosity` and `fdpo audit judge` on small files: the
/// numbers of the report against hand counts, and missing fields named.
#[test]
fn audits_report_hand_counted_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let prefs = dir.path().join("prefs.jsonl");
    let mut text = String::new();
    for (c, r) in [("a b c d", "a"), ("a b c", "a b"), ("x", "x y z"), ("same", "same")] {
        text.push_str(&serde_json::json!({"prompt": "p", "chosen": c, "rejected": r}).to_string());
        text.push('\n');
    }
    std::fs::write(&prefs, text).unwrap();
    let out = dir.path().join("v.json");
    let res = fdpo(&["audit", "verbosity", prefs.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["pairs_with_length_difference"], 3);
    assert!((v["chosen_longer"]["value"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);

    let judged = dir.path().join("judged.jsonl");
    let lines = [
        r#"{"a": "one two three", "b": "one", "winner": "a", "swapped_winner": "a", "reference": "a", "judge": "m1", "a_model": "m1", "b_model": "m2"}"#,
        r#"{"a": "one", "b": "one two three", "winner": "b", "swapped_winner": "a", "reference": "a", "judge": "m2", "a_model": "m1", "b_model": "m2"}"#,
    ];
    std::fs::write(&judged, lines.join("\n")).unwrap();
    let out = dir.path().join("j.json");
    let res = fdpo(&["audit", "judge", judged.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // Reference prefers the longer in line 1 (judge agrees), the shorter in line 2 (judge disagrees).
    assert_eq!(v["equal_opportunity"]["gap"]["value"], 1.0);
    assert_eq!(v["position"]["consistency"]["value"], 0.5);
    assert_eq!(v["length_controlled"]["raw_win_rate"]["value"], 0.5);
    // m1 judges its own output (line 1) a win; m2 judges m1's output (line 2) a loss.
    assert_eq!(v["self_preference"][0]["judge"], "m1");
    assert_eq!(v["self_preference"][0]["uplift"]["value"], 1.0);

    std::fs::write(&judged, r#"{"a": "x", "b": "y", "winner": "left"}"#).unwrap();
    let res = fdpo(&["audit", "judge", judged.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("judged.jsonl:1: field `winner`: expected \"a\", \"b\" or \"tie\""), "{err}");
    std::fs::write(&prefs, r#"{"prompt": "p", "chosen": "x"}"#).unwrap();
    let res = fdpo(&["audit", "verbosity", prefs.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&res.stderr).contains("prefs.jsonl:1: field `rejected`: missing"));
}

/// With `--model`, the policy's mean token entropy on the samples is
/// reported, equal to the entropy `fdpo-model` computes for each pair.
#[test]
fn eval_diversity_reports_policy_entropy() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("llama");
    let want = expected("llama");
    let pair = &want["pairs"][0];
    let samples = dir.path().join("s.jsonl");
    let line =
        serde_json::json!({"prompt": pair["prompt"], "responses": [pair["response"], pair["response"]]});
    std::fs::write(&samples, format!("{line}\n")).unwrap();
    let out = fdpo(&[
        "eval",
        "diversity",
        samples.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--output-dir",
        dir.path().join("d").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = v["files"][0]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "policy-entropy")
        .unwrap()
        .clone();
    let got = m["per_input_mean"].as_f64().unwrap();
    assert!((got - pair["entropy"].as_f64().unwrap()).abs() < 1e-4, "{got} vs {}", pair["entropy"]);
    // Without --model there is no entropy metric.
    let out = fdpo(&[
        "eval",
        "diversity",
        samples.to_str().unwrap(),
        "--output-dir",
        dir.path().join("e").to_str().unwrap(),
        "--json",
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["files"][0]["metrics"].as_array().unwrap().iter().all(|m| m["metric"] != "policy-entropy"));
    // GPT-2 adds no BOS: an empty prompt is refused by file and line.
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, format!("{line}\n{{\"prompt\": \"\", \"responses\": [\"a\", \"b\"]}}\n")).unwrap();
    let out = fdpo(&[
        "eval",
        "diversity",
        empty.to_str().unwrap(),
        "--model",
        fixture("gpt2").to_str().unwrap(),
        "--output-dir",
        dir.path().join("f").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!("empty.jsonl:2: field `prompt`: {}", fdpo_model::logprobs::NO_CONTEXT);
    assert!(!out.status.success() && stderr.contains(&want), "{stderr}");
}

/// Bad --bins, empty input files, and a judgement file whose pairs all
/// differ by the same length (no data at equal length) are refused or
/// reported as such.
#[test]
fn audits_refuse_bad_bins_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let prefs = dir.path().join("prefs.jsonl");
    std::fs::write(&prefs, "{\"chosen\": \"a b\", \"rejected\": \"a\"}\n").unwrap();
    for bins in ["50,10", "10,10", "0,10"] {
        let res = fdpo(&["audit", "verbosity", prefs.to_str().unwrap(), "--bins", bins]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("--bins: edges must be positive and strictly increasing, got {bins}")),
            "{err}"
        );
    }
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    for audit in ["verbosity", "judge"] {
        let res = fdpo(&["audit", audit, empty.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(1), "{err}");
        assert!(err.contains("empty.jsonl: no pairs"), "{err}");
    }
    let res = fdpo(&[
        "generate",
        "--model",
        fixture("gpt2").to_str().unwrap(),
        "--prompts",
        empty.to_str().unwrap(),
        "--out",
        dir.path().join("s.jsonl").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.code() == Some(1) && err.contains("empty.jsonl: no prompts"), "{err}");

    let judged = dir.path().join("judged.jsonl");
    let line = |w: &str| format!("{{\"a\": \"one two three\", \"b\": \"one\", \"winner\": \"{w}\"}}\n");
    std::fs::write(&judged, [line("a"), line("a"), line("b")].concat()).unwrap();
    let out = dir.path().join("j.json");
    let res = fdpo(&["audit", "judge", judged.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let lc = &v["length_controlled"];
    assert!(lc["length_controlled_win_rate"].is_null() && lc["theta"].is_null(), "{lc}");
    assert!(lc["note"].as_str().unwrap().contains("same length difference (2 words)"), "{lc}");
    let table = String::from_utf8_lossy(&res.stdout);
    assert!(table.contains("length-controlled not estimable"), "{table}");
}

/// By default `fdpo logprobs` reads and tokenises as the trainer does, so
/// its numbers are the reference log-probabilities TRL's DPOTrainer uses:
/// plain pairs (EOS appended) from a Parquet snapshot folder, and
/// conversational pairs under the real ChatML and Llama 3 templates.
#[test]
fn logprobs_equal_trls_reference_logps() {
    let trl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-train/tests/fixtures/trl");
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(trl.join("expected.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for case in want["dpo"].as_array().unwrap().iter().take(8) {
        let data = match case["data"].as_str().unwrap() {
            "explicit.jsonl" => trl.join("explicit"),
            other => trl.join(other),
        };
        let out = dir.path().join(format!("out-{checked}.jsonl"));
        let model = trl.join(case["model"].as_str().unwrap());
        let res = fdpo(&[
            "logprobs",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        for (side, key) in
            [("chosen_logprob", "ref_chosen_logps"), ("rejected_logprob", "ref_rejected_logps")]
        {
            let got: Vec<f64> = lines(&out).iter().map(|r| r[side].as_f64().unwrap()).collect();
            let expect: Vec<f64> =
                case[key].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            assert_eq!(got.len(), expect.len());
            for (g, w) in got.iter().zip(&expect) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs(),
                    "{} {}: {side} {g} vs TRL {w}",
                    case["model"],
                    case["data"]
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 8);
}
