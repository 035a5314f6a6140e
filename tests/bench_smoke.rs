//! The benchmark harness, run once as briefly as it can (`bench/run.sh --smoke`) against the
//! debug build, so that it keeps working as the gateway changes: the mocks, nginx, the bare
//! proxy and both gateways start, every kind of run completes, and after `kill -9` and a
//! restart every 2xx a client saw has its usage record in both stores (the harness exits
//! non-zero otherwise). The A/B script (`bench/ab.sh --smoke`) likewise. Their own test binary,
//! so that they run alone: `cargo test` runs test binaries one after another, and the two
//! tests here take turns. Their figures are never judged: a debug build on a shared machine
//! says nothing about speed (BENCHMARKS.md says how the real runs are made).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Held by each test while its script runs: the two would otherwise share the machine's two
/// cores and the load tool with each other.
static ALONE: Mutex<()> = Mutex::new(());

/// The debug build's gateway binary.
fn tollgate() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tollgate"))
}

/// Runs one of the bench scripts with `--smoke` and `args` against the debug build's binaries,
/// and returns the results file it wrote to `out`; `None` if the machine lacks something the
/// script needs (it exits with 3 and says what), which fails the test under `CI=true`.
fn bench_script(
    script: &str,
    args: &[&OsStr],
    envs: &[(&str, &Path)],
    out: &Path,
) -> Option<String> {
    // `cargo test` builds the examples beside the binary, where the scripts find them.
    let bin_dir = tollgate().parent().unwrap().to_path_buf();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let _alone = ALONE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut command = Command::new(root.join(script));
    command
        .arg("--smoke")
        .args(args)
        .env("BENCH_SKIP_BUILD", "1")
        .env("BENCH_NO_INSTALL", "1")
        .env("BENCH_BIN_DIR", &bin_dir);
    for (name, value) in envs {
        command.env(name, value);
    }
    let run = command.output().expect("run a bench script");
    let stderr = String::from_utf8_lossy(&run.stderr);
    if run.status.code() == Some(3) {
        unavailable(stderr.lines().last().unwrap_or_default());
        return None;
    }
    assert!(
        run.status.success(),
        "{script} --smoke failed ({}):\n{stderr}",
        run.status
    );
    Some(std::fs::read_to_string(out).expect("the results file"))
}

/// Skipped, saying why, where the machine lacks something, except under `CI=true`, where it
/// fails.
fn unavailable(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the harness smoke run cannot run: {why}"
    );
    eprintln!("skipped: {why}");
}

#[test]
fn the_benchmark_harness_runs_every_part_and_loses_no_charge() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("smoke.txt");
    let Some(results) = bench_script("bench/run.sh", &[], &[("BENCH_OUT", &out)], &out) else {
        return;
    };

    // Every part ran and wrote its raw lines.
    for kind in ["lat", "paced", "thr", "big", "stream", "held", "durable"] {
        assert!(
            results.lines().any(|l| l.starts_with(&format!("{kind} "))),
            "no `{kind}` line in the results:\n{results}"
        );
    }
    for section in [
        "Latency at concurrency 1",
        "Throughput (wrk",
        "Streaming, ",
        "Held streams",
        "Durability",
        "Against the targets",
    ] {
        assert!(results.contains(section), "no {section:?} in:\n{results}");
    }
    // Each gateway answered every held stream, and charged for every 2xx.
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .parse()
            .unwrap()
    };
    for target in ["tollgate-sqlite", "tollgate-postgres"] {
        let durable = results
            .lines()
            .find(|l| l.starts_with(&format!("durable target={target} ")))
            .unwrap();
        let (records, seen) = (field(durable, "records_200"), field(durable, "client_2xx"));
        assert!(records >= seen && seen > 1, "{durable}");
    }
    let held = results
        .lines()
        .find(|l| l.starts_with("held target=tollgate-sqlite "))
        .unwrap();
    assert_eq!(field(held, "ok"), 50, "{held}");
}

#[test]
fn the_ab_script_measures_both_builds_and_hyper_bare() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("ab.txt");
    // The same binary as A and B: the script cannot tell, and need not.
    let tollgate = tollgate();
    let Some(results) = bench_script(
        "bench/ab.sh",
        &["--out".as_ref(), out.as_os_str(), tollgate.as_os_str()],
        &[],
        &out,
    ) else {
        return;
    };
    // One run of each target, with its CPU split by thread, and the comparison.
    for target in ["bare", "A", "B"] {
        let line = results
            .lines()
            .find(|l| l.starts_with(&format!("run pair=1 target={target} ")))
            .unwrap_or_else(|| panic!("no run of {target} in:\n{results}"));
        assert!(line.contains(" user_us="), "{line}");
        assert!(line.contains(" thread:tokio-rt-worker_us="), "{line}");
    }
    assert!(results.contains("thread:sqlx-sqlite-wor_us="), "{results}");
    assert!(results.contains("B against A: req/s "), "{results}");
}
