//! Every committed input — the seed corpora and each crash or hang a fuzzing run found — runs
//! through its target here, in the normal test suite: none may panic, abort, allocate over the
//! bound or take long.

use std::path::Path;
use std::time::{Duration, Instant};

/// Longest a single input may take (AFL++ calls an input a hang past 1 s; debug-free release
/// builds on a loaded CI machine get some slack).
const SLOW: Duration = Duration::from_secs(10);

#[test]
fn every_committed_input_runs_through_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut counts = Vec::new();
    for target in graft_fuzz::TARGETS {
        let mut n = 0;
        for kind in ["corpus", "regressions"] {
            let dir = root.join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                assert_eq!(
                    kind,
                    "regressions",
                    "no seed corpus for {target}: {}",
                    dir.display()
                );
                continue;
            };
            let mut files: Vec<_> = entries.map(|e| e.expect("entry").path()).collect();
            files.sort();
            for f in files.iter().filter(|f| f.is_file()) {
                let data = std::fs::read(f).expect("input");
                let t0 = Instant::now();
                graft_fuzz::run(target, &data);
                let took = t0.elapsed();
                assert!(took < SLOW, "{target}: {} took {took:?}", f.display());
                n += 1;
            }
        }
        assert!(n > 0, "{target} has no inputs");
        counts.push(format!("{target} {n}"));
    }
    eprintln!("inputs run: {}", counts.join(", "));
}
