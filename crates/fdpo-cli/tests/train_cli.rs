//! `fdpo train` and `fdpo sft` end to end on the tiny Llama fixture: flags
//! and TOML, a run stopped as if killed and resumed to the identical model,
//! errors that name the file and the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fdpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fdpo")).args(args).output().expect("the fdpo binary runs")
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-model/tests/fixtures/llama")
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

#[test]
fn train_resumes_to_the_identical_model_and_sft_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prefs.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"the film\", \"chosen\": \" was good\", \"rejected\": \" was bad\"}\n\
         {\"prompt\": \"a story\", \"chosen\": \" so good\", \"rejected\": \" so bad\"}\n\
         {\"prompt\": \"the plot\", \"chosen\": \" is good\", \"rejected\": \" is dull\"}\n",
    )
    .unwrap();
    let config = dir.path().join("dpo.toml");
    std::fs::write(
        &config,
        "beta = 0.2\nf_divergence_type = \"alpha_divergence\"\nf_alpha_divergence_coef = 0.5\n\
         learning_rate = 0.005\nmax_steps = 5\nsave_steps = 2\nper_device_train_batch_size = 2\nlogging_steps = 1\n",
    )
    .unwrap();
    let model = fixture();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            config.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--train-file",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        fdpo(&args)
    };
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    ok(&run(&whole, &[]));
    let stopped = ok(&run(&split, &["--stop-after-steps", "3"]));
    assert!(stopped.contains("stopped after step 3"), "{stopped}");
    assert!(!split.join("final").exists());
    let resumed = ok(&fdpo(&["train", "--resume", split.to_str().unwrap()]));
    assert!(resumed.contains("resumed from step 2"), "{resumed}");
    let a = std::fs::read(whole.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(split.join("final/model.safetensors")).unwrap();
    assert!(a == b, "resumed model differs");
    // The saved configuration has the flags' values under TRL's names; TRL's
    // coefficient 0.5 is recorded as the paper's α = 1 − 0.5, unambiguously.
    let saved = std::fs::read_to_string(whole.join("config.toml")).unwrap();
    for line in ["beta = 0.2", "max_steps = 5", "f_divergence_type = \"alpha:0.5\""] {
        assert!(saved.contains(line), "{line} not in {saved}");
    }
    // A run's resolved config.toml is a valid --config for a new run (a fork).
    let fork = dir.path().join("fork");
    let whole_config = whole.join("config.toml");
    ok(&fdpo(&[
        "train",
        "--config",
        whole_config.to_str().unwrap(),
        "--output-dir",
        fork.to_str().unwrap(),
        "--max-steps",
        "1",
    ]));
    assert!(std::fs::read_to_string(fork.join("config.toml")).unwrap().contains("beta = 0.2"));
    // But not in place: the run would overwrite the file it was given.
    let e = fdpo(&["train", "--config", whole_config.to_str().unwrap(), "--max-steps", "1"]);
    let e = String::from_utf8_lossy(&e.stderr).into_owned();
    assert!(e.contains("the run writes its resolved configuration here"), "{e}");
    // --resume takes nothing else; a flag overrides the file.
    let e = fdpo(&["train", "--resume", split.to_str().unwrap(), "--beta", "1"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("drop the other options"));
    let other = dir.path().join("other");
    ok(&run(&other, &["--beta", "0.7", "--max-steps", "1", "--save-steps", "1"]));
    assert!(std::fs::read_to_string(other.join("config.toml")).unwrap().contains("beta = 0.7"));
    // A new run into a used folder is refused, and points to --resume ...
    let e = String::from_utf8_lossy(&run(&other, &["--beta", "0.3"]).stderr).into_owned();
    assert!(e.contains("already holds a run") && e.contains(&format!("--resume {}", other.display())), "{e}");
    assert!(std::fs::read_to_string(other.join("config.toml")).unwrap().contains("beta = 0.7"));
    // ... unless told to start over. With stderr not a terminal (the
    // progress bar hidden), evaluation lines and warnings still show.
    let over = ok(&run(
        &other,
        &[
            "--beta",
            "0.3",
            "--max-steps",
            "2",
            "--overwrite-output-dir",
            "--eval-file",
            data.to_str().unwrap(),
            "--eval-steps",
            "1",
            "--warmup-steps",
            "2",
        ],
    ));
    assert!(std::fs::read_to_string(other.join("config.toml")).unwrap().contains("beta = 0.3"));
    assert!(over.contains("step 1: eval_loss") && over.contains("step 2: eval_loss"), "{over}");
    assert!(over.contains("warning: the warmup (2 steps) covers the whole run (2 steps)"), "{over}");
    // Keys of another trainer are refused, not recorded and ignored.
    let e =
        fdpo(&["sft", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--beta", "0.5"]);
    let e = String::from_utf8_lossy(&e.stderr).into_owned();
    assert!(
        e.contains("unexpected argument '--beta'") && e.contains("`--beta` is an option of `fdpo train`"),
        "{e}"
    );

    // Unknown keys and bad values name the file, the line or the key.
    std::fs::write(&config, "learning_rte = 0.1\n").unwrap();
    let e = String::from_utf8_lossy(&run(&other, &[]).stderr).into_owned();
    assert!(e.contains("dpo.toml: line 1: unknown key `learning_rte`; did you mean `learning_rate`?"), "{e}");
    std::fs::write(&config, "beta = -1\n").unwrap();
    let e = String::from_utf8_lossy(&run(&other, &[]).stderr).into_owned();
    assert!(e.contains("dpo.toml: field `beta`: must be > 0"), "{e}");
    std::fs::write(&config, "").unwrap();
    std::fs::write(&data, "{\"prompt\": \"a\", \"chosen\": \"b\"}\n").unwrap();
    let e = String::from_utf8_lossy(&run(&dir.path().join("fresh"), &[]).stderr).into_owned();
    assert!(e.contains("prefs.jsonl:1: field `rejected`: missing"), "{e}");

    // SFT with --data.
    let sft_data = dir.path().join("sft.jsonl");
    std::fs::write(
        &sft_data,
        "{\"prompt\": \"the film\", \"completion\": \" was good\"}\n{\"text\": \"so good\"}\n",
    )
    .unwrap();
    let sft_out = dir.path().join("sft");
    ok(&fdpo(&[
        "sft",
        "--model",
        model.to_str().unwrap(),
        "--data",
        sft_data.to_str().unwrap(),
        "--output-dir",
        sft_out.to_str().unwrap(),
        "--max-steps",
        "3",
        "--learning-rate",
        "0.01",
        "--logging-steps",
        "1",
    ]));
    let log = std::fs::read_to_string(sft_out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    assert!(sft_out.join("final/model.safetensors").exists());
    // The run remembers its trainer: resuming it with another is refused.
    assert!(std::fs::read_to_string(sft_out.join("config.toml")).unwrap().contains("trainer = \"sft\""));
    let e = fdpo(&["train", "--resume", sft_out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&e.stderr).into_owned();
    assert!(e.contains("this run was started by `fdpo sft`; continue it with `fdpo sft --resume"), "{e}");
}

fn trl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-train/tests/fixtures/trl")
}

/// A TRL CLI recipe runs unchanged: `model_name_or_path`, `dataset_name` as
/// a local snapshot folder of Parquet shards, TRL keys fdpo ignores (with a
/// warning each); the first logged loss is TRL's on the same pairs (ln 2:
/// the reference is the policy), and config.toml records fdpo's names.
#[test]
fn a_trl_yaml_recipe_runs_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let yaml = dir.path().join("dpo.yaml");
    std::fs::write(
        &yaml,
        format!(
            "model_name_or_path: {}\ndataset_name: {}\ndataset_train_split: train\noutput_dir: {}\n\
             per_device_train_batch_size: 4\nmax_steps: 1\nlogging_steps: 1\nlearning_rate: 1.0e-3\nbeta: 0.1\n\
             max_length: 256\nbf16: true\nreport_to: none\ngradient_checkpointing: true\n\
             f_divergence_type: reverse_kl\nf_alpha_divergence_coef: 0.5\nuse_peft: false\n",
            trl().join("chatml").display(),
            trl().join("conversational").display(),
            out.display()
        ),
    )
    .unwrap();
    let err = ok(&fdpo(&["train", "--config", yaml.to_str().unwrap()]));
    for key in ["bf16", "report_to", "gradient_checkpointing", "f_alpha_divergence_coef"] {
        assert!(
            err.contains(&format!("warning: {}: ", yaml.display())) && err.contains(&format!("`{key}`")),
            "{key}: {err}"
        );
    }
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
    let recorded = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        recorded.contains("model = ") && recorded.contains("train_file = ") && !recorded.contains("bf16"),
        "{recorded}"
    );
}

/// A malformed Parquet training file is named by file, row and column, and
/// nothing is written.
#[test]
fn malformed_parquet_names_row_and_column_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let bad = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-data/tests/fixtures/null_chosen.parquet");
    let res = fdpo(&[
        "train",
        "--model",
        fixture().to_str().unwrap(),
        "--train-file",
        bad.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(res.status.code(), Some(1));
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("null_chosen.parquet: row 2: column `chosen`: invalid type: null"), "{err}");
    assert!(!out.exists(), "nothing written");
}
