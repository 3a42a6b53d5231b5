//! `fdpo kto` end to end on the TRL fixture models: a run stopped as if
//! killed and resumed ends with the same weights as an uninterrupted one;
//! malformed unpaired data is named by file, line and field, and nothing
//! is written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fdpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fdpo")).args(args).output().expect("the fdpo binary runs")
}

fn trl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-train/tests/fixtures")
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

#[test]
fn kto_resumes_to_the_identical_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = trl().join("trl/chatml_policy");
    let reference = trl().join("trl/chatml");
    let data = trl().join("trl_kto/unpaired.jsonl");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "kto",
            "--model",
            model.to_str().unwrap(),
            "--ref-model",
            reference.to_str().unwrap(),
            "--train-file",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--per-device-train-batch-size",
            "4",
            "--max-steps",
            "4",
            "--save-steps",
            "2",
            "--logging-steps",
            "1",
            "--learning-rate",
            "0.01",
            "--undesirable-weight",
            "1.5",
            "--max-length",
            "256",
        ];
        args.extend(extra);
        fdpo(&args)
    };
    let (whole, split) = (dir.path().join("whole"), dir.path().join("split"));
    let err = ok(&run(&whole, &[]));
    assert!(err.contains("8 examples: 5 desirable, 3 undesirable"), "{err}");
    let stopped = ok(&run(&split, &["--stop-after-steps", "3"]));
    assert!(stopped.contains("stopped after step 3"), "{stopped}");
    let resumed = ok(&fdpo(&["kto", "--resume", split.to_str().unwrap()]));
    assert!(resumed.contains("resumed from step 2"), "{resumed}");
    let a = std::fs::read(whole.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(split.join("final/model.safetensors")).unwrap();
    assert!(a == b, "resumed model differs");
    let log = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    assert!(log.lines().all(|l| l.contains("\"kl\"") && l.contains("\"count/desirable\"")), "{log}");
    // The run remembers its trainer.
    let e =
        String::from_utf8_lossy(&fdpo(&["train", "--resume", whole.to_str().unwrap()]).stderr).into_owned();
    assert!(e.contains("this run was started by `fdpo kto`"), "{e}");
}

#[test]
fn malformed_unpaired_data_is_named_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = trl().join("trl/chatml");
    let data = dir.path().join("kto.jsonl");
    let out = dir.path().join("run");
    let good = "{\"prompt\": \"a\", \"completion\": \" b\", \"label\": true}\n";
    for (line, want) in [
        ("{\"prompt\": \"a\", \"completion\": \" b\"}", "kto.jsonl:2: field `label`: missing"),
        (
            "{\"prompt\": \"a\", \"completion\": \" b\", \"label\": \"yes\"}",
            "kto.jsonl:2: field `label`: invalid type: string \"yes\", expected a boolean",
        ),
        (
            "{\"prompt\": \"a\", \"completion\": \"  \", \"label\": false}",
            "kto.jsonl:2: field `completion`: empty",
        ),
    ] {
        std::fs::write(&data, format!("{good}{line}\n")).unwrap();
        let res = fdpo(&[
            "kto",
            "--model",
            model.to_str().unwrap(),
            "--train-file",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
        ]);
        assert_eq!(res.status.code(), Some(1));
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains(want), "{want}: {err}");
        assert!(!out.exists(), "nothing written");
    }
}
