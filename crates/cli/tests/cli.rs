//! The `tidewire` binary end to end: bench in pair mode (two processes), info, metadata-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn tidewire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tidewire"))
}

#[test]
fn bench_pair_prints_json_with_baselines() {
    for (transport, baseline) in [("tcp", "raw-tcp"), ("shm", "memcpy")] {
        let out = tidewire()
            .args([
                "bench",
                "--pair",
                "--transport",
                transport,
                "--block-size",
                "4KiB,64KiB",
                "--batch-size",
                "8",
            ])
            .args(["--duration", "200ms", "--json", "--baseline", baseline, "--op", "read"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{transport}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<serde_json::Value> =
            stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "one line per block size: {stdout}");
        for l in &lines {
            assert_eq!(l["transport"], transport);
            assert_eq!(l["baseline"], baseline);
            for key in ["gbps", "p50_us", "p99_us", "baseline_gbps", "ratio", "req_per_s"] {
                assert!(l[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {l}");
            }
        }
    }
}

/// With no --baseline, each transport is compared with its own ceiling and the output says
/// which: the README's first command must not read as "N times faster than TCP".
#[test]
fn bench_default_names_its_baseline() {
    let quick = ["--block-size", "4KiB", "--batch-size", "8", "--duration", "200ms"];
    let out = tidewire().args(["bench", "--pair"]).args(quick).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let row = stdout.lines().find(|l| l.starts_with("shm ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(row.ends_with(" vs memcpy (same-host ceiling for shm)"), "{stdout}");

    let out =
        tidewire().args(["bench", "--pair", "--transport", "tcp", "--json"]).args(quick).output();
    let out = out.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let l: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(l["transport"], "tcp", "{l}");
    assert_eq!(l["baseline"], "raw-tcp", "{l}");
    assert_eq!(l["baseline_note"], "a plain TCP stream, the ceiling for tcp", "{l}");
    assert!(l["ratio"].as_f64().is_some_and(|v| v > 0.0), "{l}");
}

/// A baseline forced by --baseline that is not the transport's ceiling says so.
#[test]
fn bench_forced_baseline_says_what_it_compares() {
    let out = tidewire()
        .args(["bench", "--pair", "--transport", "shm", "--baseline", "raw-tcp", "--json"])
        .args(["--block-size", "4KiB", "--batch-size", "8", "--duration", "200ms"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let l: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(l["baseline"], "raw-tcp", "{l}");
    assert_eq!(
        l["baseline_note"], "chosen by --baseline, not shm's own ceiling, which is memcpy",
        "{l}"
    );
}

#[test]
fn bench_rejects_bad_arguments() {
    let out = tidewire().args(["bench", "--pair", "--block-size", "4XB"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("4XB"));
}

#[test]
fn info_explains_a_peer_through_the_metadata_server() {
    let mut server = tidewire()
        .args(["metadata-server", "--port", "0", "--host", "127.0.0.1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().last().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");

    // A target engine registered under a name, in a child process.
    let mut target = tidewire()
        .args([
            "bench",
            "--role",
            "target",
            "--metadata",
            &url,
            "--block-size",
            "4KiB",
            "--batch-size",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(target.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    let name = ready.split_whitespace().nth(1).unwrap().to_string();

    let out = tidewire().args(["info", "--metadata", &url, "--peer", &name]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("nvlink    no — GPU unavailable"), "{text}");
    // libfabric (installed by scripts/test.sh): its providers, and why none is used here.
    assert!(
        text.contains("fabric    libfabric 1.") && text.contains("tcp;ofi_rxm")
            || text.contains("fabric    no — libfabric is not installed"),
        "{text}"
    );
    assert!(
        text.contains("not used — no RDMA provider (efa, verbs) here")
            || text.contains("fabric    no"),
        "{text}"
    );
    assert!(text.contains("same host: true"), "{text}");
    assert!(text.contains("shm — same host and the remote region is a shareable memfd"), "{text}");

    let forced = tidewire()
        .args(["info", "--metadata", &url, "--peer", &name])
        .env("MC_FORCE_TCP", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&forced.stdout).contains("tcp — MC_FORCE_TCP is set"));

    let missing =
        tidewire().args(["info", "--metadata", &url, "--peer", "nobody"]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("segment \"nobody\" not found"));

    drop(target.stdin.take());
    let _ = target.kill();
    let _ = target.wait();
    let _ = server.kill();
    let _ = server.wait();
    std::thread::sleep(Duration::from_millis(1));
}
