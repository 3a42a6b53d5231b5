//! Parquet as Hugging Face `datasets` writes it, read through the one
//! reader: the same records as the JSONL beside it (flat strings and
//! `list<struct<role, content>>` messages; Snappy and Zstd; shards in
//! order), and malformed files named by file, row and column, never a panic.
//! The valid files come from fdpo-train's TRL fixture script, the malformed
//! ones from tests/fixtures/make_malformed.py.

use std::path::{Path, PathBuf};

use fdpo_data::records::{read_records, read_rows, PreferenceRecord};

fn trl() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fdpo-train/tests/fixtures/trl")
}

fn malformed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn records(path: &Path) -> Vec<PreferenceRecord> {
    read_records::<PreferenceRecord>(path, "train").unwrap().into_iter().map(|(_, r)| r).collect()
}

#[test]
fn parquet_snapshots_read_as_their_jsonl() {
    for form in ["explicit", "implicit", "conversational", "conversational_implicit"] {
        let jsonl = records(&trl().join(format!("{form}.jsonl")));
        assert!(!jsonl.is_empty());
        // The snapshot folder, and the shard inside it.
        assert_eq!(records(&trl().join(form)), jsonl, "{form} folder");
        assert_eq!(
            records(&trl().join(form).join("data/train-00000-of-00001.parquet")),
            jsonl,
            "{form} file"
        );
    }
    let explicit = records(&trl().join("explicit.jsonl"));
    assert_eq!(records(&trl().join("explicit_sharded")), explicit, "two shards, in order");
    assert_eq!(records(&trl().join("explicit_zstd.parquet")), explicit, "zstd pages");
    // Rows are numbered from 0 in each shard.
    let rows = read_rows(&trl().join("explicit_sharded"), "train").unwrap();
    let at: Vec<String> = rows.iter().map(|r| r.at.to_string()).collect();
    assert!(at[3].ends_with("train-00001-of-00002.parquet: row 0"), "{at:?}");
}

#[test]
fn malformed_parquet_is_named_by_file_row_and_column() {
    let err = |path: &Path| read_records::<PreferenceRecord>(path, "train").unwrap_err().to_string();
    let cases = [
        ("wrong_type.parquet", "wrong_type.parquet: row 0: column `chosen`: invalid type: integer `1`, expected a string or a list of {role, content} messages"),
        ("missing_chosen.parquet", "missing_chosen.parquet: row 0: column `chosen`: missing"),
        ("null_chosen.parquet", "null_chosen.parquet: row 2: column `chosen`: invalid type: null"),
        ("bad_message.parquet", "bad_message.parquet: row 0: column `chosen[0]`: missing field `content`"),
    ];
    for (name, want) in cases {
        let e = err(&malformed(name));
        assert!(e.contains(want), "{name}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    // Truncated: the footer is gone.
    let whole = std::fs::read(trl().join("explicit_zstd.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let e = err(&cut);
    assert!(e.contains("cut.parquet: not a readable Parquet file"), "{e}");
    // The footer kept, the data pages cut out.
    let hollow = dir.path().join("hollow.parquet");
    std::fs::write(&hollow, [&whole[..8], &whole[whole.len() / 2..]].concat()).unwrap();
    let e = err(&hollow);
    assert!(e.contains("hollow.parquet"), "{e}");
    // Not Parquet at all.
    let text = dir.path().join("prefs.parquet");
    std::fs::write(&text, "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n").unwrap();
    let e = err(&text);
    assert!(e.contains("prefs.parquet: not a readable Parquet file"), "{e}");
}
