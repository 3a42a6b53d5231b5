//! End-to-end tests of `fdpo exact …`: run the binary on small instances and
//! check the numbers it prints and writes against independent computations.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn fdpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fdpo")).args(args).output().expect("the fdpo binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = fdpo(args);
    assert!(out.status.success(), "fdpo {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn failure(args: &[&str]) -> String {
    let out = fdpo(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "fdpo {args:?} should fail cleanly:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

const TWO_PROMPTS: &str = r#"{"prompts": [
  {"id": "a", "responses": [
    {"text": "short", "ref_prob": 0.5, "reward": 1.0},
    {"text": "a longer answer", "ref_prob": 0.3, "reward": 0.0},
    {"text": "x", "ref_prob": 0.2, "reward": -0.5}]},
  {"id": "b", "responses": [
    {"text": "yes", "ref_logprob": -0.2231435513142097, "reward": 0.2},
    {"text": "no", "ref_logprob": -1.6094379124341003, "reward": 0.9}]}]}"#;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Reverse KL: π* ∝ π_ref·exp(r/β), the softmax closed form.
#[test]
fn solve_json_reverse_kl_is_softmax() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "i.json", TWO_PROMPTS);
    let out: Value = serde_json::from_str(&ok(&[
        "exact",
        "solve",
        "--instance",
        &file,
        "--divergence",
        "rkl",
        "--beta",
        "0.5",
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["divergence"], "reverse-kl");
    assert_eq!(out["beta"], 0.5);
    let policy = floats(&out["prompts"][0]["policy"]);
    let w = [0.5 * (2.0f64).exp(), 0.3, 0.2 * (-1.0f64).exp()];
    let z: f64 = w.iter().sum();
    for (p, wi) in policy.iter().zip(w) {
        assert!((p - wi / z).abs() < 1e-14, "{policy:?}");
    }
    let reward = out["prompts"][0]["reward"].as_f64().unwrap();
    let want: f64 = w.iter().zip([1.0, 0.0, -0.5]).map(|(wi, r)| wi / z * r).sum();
    assert!((reward - want).abs() < 1e-14);
    let mean = out["reward"].as_f64().unwrap();
    let r1 = out["prompts"][1]["reward"].as_f64().unwrap();
    assert!((mean - (reward + r1) / 2.0).abs() < 1e-15);
}

/// Forward KL: π* = π_ref·β/(λ − r); an independent bisection on λ.
#[test]
fn solve_json_forward_kl_matches_bisection() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "i.json", TWO_PROMPTS);
    let beta = 0.3;
    let out: Value = serde_json::from_str(&ok(&[
        "exact",
        "solve",
        "--instance",
        &file,
        "--divergence",
        "forward-kl",
        "--beta",
        "0.3",
        "--json",
    ]))
    .unwrap();
    let (q, r) = ([0.5, 0.3, 0.2], [1.0, 0.0, -0.5]);
    let mass = |lambda: f64| q.iter().zip(r).map(|(qi, ri)| qi * beta / (lambda - ri)).sum::<f64>();
    let (mut lo, mut hi) = (1.0 + 1e-12, 100.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mass(mid) > 1.0 {
            lo = mid
        } else {
            hi = mid
        }
    }
    let lambda = 0.5 * (lo + hi);
    let policy = floats(&out["prompts"][0]["policy"]);
    for ((p, qi), ri) in policy.iter().zip(q).zip(r) {
        assert!((p - qi * beta / (lambda - ri)).abs() < 1e-12, "{policy:?}");
    }
    assert!((out["prompts"][0]["lambda"].as_f64().unwrap() - lambda).abs() < 1e-10);
}

#[test]
fn solve_reports_normalisation_and_prints_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "u.json",
        r#"{"prompts": [{"id": "q", "responses": [{"ref_prob": 2, "reward": 1}, {"ref_prob": 6, "reward": 0}]}]}"#,
    );
    let out = fdpo(&["exact", "solve", "--instance", &file, "--divergence", "js", "--beta", "1"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not sum to 1 and were normalised: q"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("divergence js, beta 1") && stdout.contains("mean"), "{stdout}");
}

#[test]
fn malformed_instances_fail_with_prompt_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("{\"prompts\": [", "invalid JSON"),
        (r#"{"prompts": [{"responses": []}]}"#, "prompts[0].responses: the response list is empty"),
        (
            r#"{"prompts": [{"responses": [{"ref_prob": 1, "reward": 0}]}, {"responses": [{"ref_prob": -1, "reward": 0}]}]}"#,
            "prompts[1].responses[0].ref_prob: must be >= 0",
        ),
        (
            r#"{"prompts": [{"responses": [{"ref_prob": 1}]}]}"#,
            "prompts[0].responses[0].reward: missing field",
        ),
        (
            r#"{"prompts": [{"responses": [{"ref_prob": 1, "reward": [1]}]}]}"#,
            "prompts[0].responses[0].reward: expected a number, found an array",
        ),
        (
            r#"{"prompts": [{"responses": [{"ref_logprob": 0.5, "reward": 0}]}]}"#,
            "prompts[0].responses[0].ref_logprob: must be <= 0, got 0.5",
        ),
        (
            r#"{"prompts": [{"responses": [{"ref_logprob": "nan", "reward": 0}]}]}"#,
            "prompts[0].responses[0].ref_logprob: must be a finite number, got nan",
        ),
        (
            r#"{"prompts": [{"responses": [{"ref_prob": 1, "reward": 0}]}, {"responses": [{"ref_prob": NaN, "reward": 0}]}]}"#,
            "prompts[1].responses[0].ref_prob: must be a finite number, got NaN",
        ),
    ];
    for (k, (text, want)) in cases.iter().enumerate() {
        let file = write(dir.path(), &format!("bad{k}.json"), text);
        let stderr = failure(&["exact", "solve", "--instance", &file, "--divergence", "rkl", "--beta", "1"]);
        assert!(stderr.contains(want), "case {k}: {stderr}");
        assert!(stderr.contains(&file), "case {k} should name the file: {stderr}");
    }
    let stderr =
        failure(&["exact", "solve", "--instance", "/nonexistent.json", "--divergence", "rkl", "--beta", "1"]);
    assert!(stderr.contains("/nonexistent.json"));
}

#[test]
fn inadmissible_divergences_and_bad_options_are_refused() {
    let out = fdpo(&["exact", "solve", "--random", "0", "--divergence", "chi2", "--beta", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not admissible"));
    let out = fdpo(&["exact", "solve", "--random", "0", "--divergence", "alpha:1.2", "--beta", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("strictly inside (0, 1)"));
    let stderr = failure(&["exact", "solve", "--divergence", "rkl", "--beta", "1"]);
    assert!(stderr.contains("--instance FILE or --random SEED"), "{stderr}");
}

/// β is checked while parsing (clap's usage error, exit code 2), once, by
/// every exact subcommand, before any instance is read (the file here does
/// not exist).
#[test]
fn bad_betas_are_refused_while_parsing() {
    let cases: [&[&str]; 6] = [
        &["solve", "--divergence", "rkl", "--beta", "0"],
        &["coverage", "--beta", "0"],
        &["frontier", "--beta", "1,0"],
        &["gap", "--beta", "inf"],
        &["frontier", "--beta-min", "0"],
        &["gap", "--beta-max", "NaN"],
    ];
    for args in cases {
        let mut all = vec!["exact"];
        all.extend_from_slice(args);
        all.extend(["--instance", "/nonexistent.json"]);
        let out = fdpo(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let value = args.last().unwrap().rsplit(',').next().unwrap();
        let want = format!("must be finite and > 0, got {value}");
        assert_eq!(stderr.matches(&want).count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("for '{}", args[args.len() - 2])), "{args:?}: {stderr}");
        assert!(!stderr.contains("nonexistent"), "{args:?}: {stderr}");
    }
}

/// Counts of pairs must be at least 1 (0 pairs per round would make the
/// iterative variant's rounds silently empty) and the ridge positive,
/// refused while parsing.
#[test]
fn zero_pair_counts_are_refused_while_parsing() {
    for args in
        [&["--pairs-per-round", "0"][..], &["--pairs", "8,0"][..], &["--ridge=-1"][..], &["--ridge", "0"][..]]
    {
        let mut all = vec!["exact", "coverage", "--instance", "/nonexistent.json"];
        all.extend_from_slice(args);
        let out = fdpo(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let flag = args[0].split('=').next().unwrap();
        assert!(stderr.contains(&format!("for '{flag}")), "{args:?}: {stderr}");
    }
}

/// `--random … --save` writes an instance that, read back, gives the same answer.
#[test]
fn random_instance_saves_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("r.json").to_string_lossy().into_owned();
    let common = ["--divergence", "alpha:0.5", "--beta", "0.2", "--json"];
    let a: Value = serde_json::from_str(&ok(&[
        &["exact", "solve", "--random", "4", "--prompts", "3", "--responses", "7", "--save", &saved][..],
        &common,
    ]
    .concat()))
    .unwrap();
    let b: Value =
        serde_json::from_str(&ok(&[&["exact", "solve", "--instance", &saved][..], &common].concat()))
            .unwrap();
    assert_eq!(a["prompts"].as_array().unwrap().len(), 3);
    for k in 0..3 {
        for (x, y) in floats(&a["prompts"][k]["policy"]).iter().zip(floats(&b["prompts"][k]["policy"])) {
            assert!((x - y).abs() < 1e-12);
        }
    }
}

fn read_csv(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// Frontier rows agree with `solve` at the same (divergence, β), and the plots exist.
#[test]
fn frontier_writes_csv_consistent_with_solve() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "i.json", TWO_PROMPTS);
    let out_dir = dir.path().join("front");
    ok(&[
        "exact",
        "frontier",
        "--instance",
        &file,
        "--divergence",
        "fkl,alpha:0.4",
        "--beta",
        "0.1,1,10",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    let rows = read_csv(&out_dir.join("frontier.csv"));
    assert_eq!(
        rows[0],
        ["divergence", "alpha", "beta", "reward", "entropy", "divergence_value", "kl", "objective"]
    );
    assert_eq!(rows.len(), 1 + 1 + 2 * 3);
    assert_eq!(rows[1][0], "reference");
    // E_π_ref[r] of the instance, by hand: prompt a 0.5·1 + 0.3·0 + 0.2·(−0.5) = 0.4; b 0.8·0.2 + 0.2·0.9 = 0.34.
    assert!((rows[1][3].parse::<f64>().unwrap() - 0.37).abs() < 1e-12);
    let row = rows.iter().find(|r| r[0] == "alpha:0.4" && r[2] == "1").unwrap();
    assert_eq!(row[1], "0.4");
    let solved: Value = serde_json::from_str(&ok(&[
        "exact",
        "solve",
        "--instance",
        &file,
        "--divergence",
        "alpha:0.4",
        "--beta",
        "1",
        "--json",
    ]))
    .unwrap();
    assert!((row[3].parse::<f64>().unwrap() - solved["reward"].as_f64().unwrap()).abs() < 1e-15);
    assert!((row[4].parse::<f64>().unwrap() - solved["entropy"].as_f64().unwrap()).abs() < 1e-15);
    for ext in ["svg", "png"] {
        assert!(std::fs::metadata(out_dir.join(format!("frontier.{ext}"))).unwrap().len() > 1000);
    }
}

#[test]
fn gap_is_zero_without_error_and_positive_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("gap");
    ok(&[
        "exact",
        "gap",
        "--random",
        "1",
        "--prompts",
        "4",
        "--responses",
        "10",
        "--divergence",
        "rkl,js",
        "--error",
        "gaussian:0,length-bias:1",
        "--beta",
        "0.1,1",
        "--output-dir",
        out_dir.to_str().unwrap(),
    ]);
    let rows = read_csv(&out_dir.join("gap.csv"));
    assert_eq!(rows.len(), 1 + 2 * 2 * 2);
    for r in &rows[1..] {
        let objective_gap: f64 = r[5].parse().unwrap();
        if r[2] == "gaussian:0" {
            assert!(objective_gap.abs() < 1e-12 && r[6] == "-inf", "{r:?}");
        } else {
            assert!(objective_gap > 0.0, "{r:?}");
        }
    }
    for f in ["gap.svg", "gap.png", "bound.svg", "bound.png"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
}

#[test]
fn coverage_is_deterministic_and_has_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        let out_dir = dir.path().join(name);
        ok(&[
            "exact",
            "coverage",
            "--random",
            "2",
            "--prompts",
            "5",
            "--responses",
            "8",
            "--divergence",
            "rkl",
            "--pairs",
            "10,100",
            "--rounds",
            "3",
            "--pairs-per-round",
            "20",
            "--seed",
            "7",
            "--output-dir",
            out_dir.to_str().unwrap(),
        ]);
        std::fs::read_to_string(out_dir.join("coverage.csv")).unwrap()
    };
    let a = run("a");
    assert_eq!(a, run("b"));
    let rows: Vec<Vec<&str>> = a.lines().map(|l| l.split(',').collect()).collect();
    // 3 data policies × 2 sizes + 3 rounds.
    assert_eq!(rows.len(), 1 + 3 * 2 + 3);
    let iterative: Vec<&str> = rows.iter().filter(|r| r[3] == "iterative").map(|r| r[4]).collect();
    assert_eq!(iterative, ["20", "40", "60"]);
    assert!(rows[1..].iter().all(|r| r[7].parse::<f64>().unwrap() >= -1e-12));
}
