//! The durable writes really reach the disk: this test runs them in a child
//! process under an LD_PRELOAD shim (`fsync_log.c`, built here with the C
//! compiler the build already needs) that records every fsync, and checks
//! that the new file, its folder, and every file of a sled database and its
//! folder were fsynced. (Reopening in the same process, as a plain test
//! would, reads the page cache and passes without any fsync.)

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the child does under the shim.
fn durable_writes(dir: &Path) {
    tern_durable::write_atomic(&dir.join("key"), b"secret", true).unwrap();
    let db_dir = dir.join("db");
    let db = sled::open(&db_dir).unwrap();
    db.insert(b"k", b"v").unwrap();
    tern_durable::sync_sled(&db, &db_dir).unwrap();
}

#[test]
fn child() {
    // Runs only when the parent test starts this binary as its child.
    if let Some(dir) = std::env::var_os("TERN_FSYNC_CHILD") {
        durable_writes(Path::new(&dir));
    }
}

fn build_shim(out: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fsync_log.c");
    let so = out.join("fsync_log.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .status()
        .expect("a C compiler (cc): scripts/ensure-deps installs one");
    assert!(status.success(), "building {}", src.display());
    so
}

#[test]
fn atomic_writes_and_sled_syncs_are_fsynced() {
    let tmp = tempfile::tempdir().unwrap();
    let shim = build_shim(tmp.path());
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let log = tmp.path().join("fsync.log");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env("LD_PRELOAD", &shim)
        .env("TERN_FSYNC_LOG", &log)
        .env("TERN_FSYNC_CHILD", &work)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let synced: Vec<PathBuf> =
        std::fs::read_to_string(&log).expect("no fsync at all was recorded").lines().map(PathBuf::from).collect();
    let work = work.canonicalize().unwrap();
    let has = |p: &Path| synced.iter().any(|s| s == p);
    // write_atomic: the temporary file before its rename, then the folder.
    assert!(
        synced
            .iter()
            .any(|s| s.parent() == Some(&work) && s.file_name().unwrap().to_string_lossy().starts_with(".key.tmp")),
        "{synced:?}"
    );
    assert!(has(&work), "the folder of the new file: {synced:?}");
    // sync_sled: each of the database's files, and its folder.
    let db = work.join("db");
    for entry in std::fs::read_dir(&db).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            assert!(has(&p), "{} not fsynced: {synced:?}", p.display());
        }
    }
    assert!(has(&db), "the database folder: {synced:?}");
}
