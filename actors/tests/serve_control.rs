//! The control socket with SmolLM2 under a memory budget (so some layers stream): hints
//! (prefetch, pin, release) change residency as seen in stats, load progress is reported, and a malformed or oversized frame
//! closes only its own connection.

mod serve_common;

use rocmforge_actors::serve::control::{ControlClient, ControlRequest, ControlResponse};
use rocmforge_actors::{Hint, MemoryBudget, ReadMode, Stats};
use serve_common::{config, start};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn stats(c: &mut ControlClient) -> Stats {
    match c.request(&ControlRequest::Stats).unwrap() {
        ControlResponse::Stats(s) => s,
        other => panic!("expected stats, got {other:?}"),
    }
}

/// Polls until `pred` holds (loads finish in the background), bounded.
fn wait_for(c: &mut ControlClient, what: &str, pred: impl Fn(&Stats) -> bool) -> Stats {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let s = stats(c);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < until, "{what}: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when the server closed the connection (EOF or reset), without waiting forever.
fn closed(s: &mut std::os::unix::net::UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_stats_progress_and_malformed_frames() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let mut cfg = config();
    cfg.control_socket = Some(sock.clone());
    cfg.memory_budget = MemoryBudget::FractionOfWeights(0.5);
    cfg.read_mode = Some(ReadMode::Read);
    cfg.prefetch_depth = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();

    let sock2 = sock.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = ControlClient::connect(&sock2).unwrap();
        match c.request(&ControlRequest::LoadProgress).unwrap() {
            ControlResponse::LoadProgress(p) => {
                assert!(p.initial_done && p.read_bytes >= p.initial_bytes, "{p:?}")
            }
            other => panic!("expected load progress, got {other:?}"),
        }
        let s0 = stats(&mut c);
        let n = s0.resident_layers.len() - 1;
        assert!(s0.budget_bytes < s0.total_weight_bytes, "{s0:?}");
        // Two streamed layers that are not resident now (from the end: the window is at the
        // start of the model while idle).
        let absent: Vec<usize> = (0..n)
            .rev()
            .filter(|&l| !s0.fixed_layers.contains(&l) && !s0.resident_layers[l])
            .take(2)
            .collect();
        let &[p, l] = absent.as_slice() else {
            panic!("fewer than two streamed, absent layers: {s0:?}")
        };

        // Prefetch of a resident layer: accepted, a no-op the stats count.
        let resident = s0.fixed_layers[0];
        let r = c
            .request(&ControlRequest::Hint(Hint::Prefetch {
                layers: vec![resident],
            }))
            .unwrap();
        assert_eq!(r, ControlResponse::Ok);
        assert_eq!(stats(&mut c).hint_noops, s0.hint_noops + 1);

        // Prefetch an absent streamed layer: it is loaded now, within the budget (a fixed layer
        // makes room until the prefetched one has been used).
        let r = c
            .request(&ControlRequest::Hint(Hint::Prefetch { layers: vec![p] }))
            .unwrap();
        assert_eq!(r, ControlResponse::Ok);
        let sp = wait_for(&mut c, "prefetched layer resident", |s| {
            s.resident_layers[p]
        });
        assert_eq!(sp.loads_per_layer[p], s0.loads_per_layer[p] + 1, "{sp:?}");
        assert!(sp.resident_bytes <= sp.budget_bytes, "{sp:?}");
        assert!(sp.peak_resident_bytes <= sp.budget_bytes, "{sp:?}");
        assert!(sp.fixed_layers.len() < s0.fixed_layers.len(), "{sp:?}");
        assert_eq!(sp.hint_noops, s0.hint_noops + 1);

        // Pin the other absent layer: it becomes resident and stays listed as pinned.
        let r = c
            .request(&ControlRequest::Hint(Hint::Pin { layers: vec![l] }))
            .unwrap();
        assert_eq!(r, ControlResponse::Ok);
        let s1 = wait_for(&mut c, "pinned layer resident", |s| s.resident_layers[l]);
        assert_eq!(s1.pinned_layers, vec![l]);
        assert!(s1.loads_per_layer[l] > s0.loads_per_layer[l], "{s1:?}");

        // A hint the budget cannot honour is answered, not fatal.
        let all: Vec<usize> = (0..n).collect();
        match c
            .request(&ControlRequest::Hint(Hint::Pin { layers: all }))
            .unwrap()
        {
            ControlResponse::Error(m) => assert!(m.contains("rejected"), "{m}"),
            other => panic!("expected an error, got {other:?}"),
        }
        let r = c
            .request(&ControlRequest::Hint(Hint::Release { layers: vec![l] }))
            .unwrap();
        assert_eq!(r, ControlResponse::Ok);
        assert!(stats(&mut c).pinned_layers.is_empty());

        // A frame that does not decode closes that connection only.
        let mut bad = ControlClient::connect(&sock2).unwrap();
        let s = bad.stream();
        s.write_all(&4u32.to_le_bytes()).unwrap();
        s.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        assert!(closed(s), "malformed frame did not close the connection");
        // So does a length past the limit.
        let mut big = ControlClient::connect(&sock2).unwrap();
        big.stream().write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(
            closed(big.stream()),
            "oversized frame did not close the connection"
        );
        // The first connection still works.
        let s2 = stats(&mut c);
        assert_eq!(s2.total_weight_bytes, s0.total_weight_bytes);
    })
    .await
    .unwrap();

    // HTTP still serves too.
    let h = rocmforge_actors::serve::client::request(addr, "GET", "/health", None)
        .await
        .unwrap();
    assert_eq!(h.status, 200);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(!sock.exists(), "control socket file removed on shutdown");
}
