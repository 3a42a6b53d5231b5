//! Peak memory of the reference cache key on a 1 GiB checkpoint: the key
//! streams each shard through BLAKE3, so the process's peak resident set
//! grows by far less than the file (the bound: 100 MiB). Its own test
//! binary, so that no other test's allocations move the peak.

use std::path::Path;

use fdpo_train::reference::cache_key;

/// The process's peak resident set (VmHWM), in KiB, from /proc.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_one_gib_shard_is_hashed_in_bounded_memory() {
    let Some(baseline) = peak_rss_kib() else {
        eprintln!("no /proc/self/status here: peak memory not measured");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
    // A sparse file: 1 GiB of zeros that costs no disk.
    let shard = std::fs::File::create(dir.path().join("model.safetensors")).unwrap();
    shard.set_len(1 << 30).unwrap();
    drop(shard);
    let key = cache_key(Path::new(dir.path()), &[], "").unwrap();
    let grown_mib = (peak_rss_kib().unwrap() - baseline) / 1024;
    assert!(grown_mib < 100, "peak RSS grew by {grown_mib} MiB hashing a 1 GiB shard");
    // And the key did read the whole shard: one more zero byte changes it.
    let shard = std::fs::OpenOptions::new().write(true).open(dir.path().join("model.safetensors")).unwrap();
    shard.set_len((1 << 30) + 1).unwrap();
    assert_ne!(cache_key(Path::new(dir.path()), &[], "").unwrap(), key);
}
