//! `graft-fuzz run TARGET FILE…` replays inputs (a crash found by AFL++, a corpus);
//! `graft-fuzz seeds DIR` writes the seed corpora; `graft-fuzz afl TARGET` is AFL++'s persistent-mode entry point (feature `afl`, built with
//! `cargo afl build`; `scripts/fuzz.sh` runs every target).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, target, files @ ..] if cmd == "run" => {
            for f in files {
                let data = match std::fs::read(f) {
                    Ok(d) => d,
                    Err(e) => {
                        eprintln!("graft-fuzz: reading {f}: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                graft_fuzz::run(target, &data);
                println!("{target}: {f}: ok");
            }
            ExitCode::SUCCESS
        }
        [cmd, dir] if cmd == "seeds" => match graft_fuzz::seeds::write_all(dir.as_ref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("graft-fuzz: writing seeds to {dir}: {e}");
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "afl")]
        [cmd, target] if cmd == "afl" => {
            let target = target.clone();
            // One-time set-up (the tiny model, a target's sandbox) before AFL++'s fork server
            // starts, so no fuzzed run pays for it (or times out on it).
            graft_fuzz::run(&target, &[]);
            // A panic graft catches on purpose (the dataset readers turn the Arrow and Parquet
            // readers' panics into the file's error) is not a crash; one that escapes is.
            afl::fuzz_nohook!(|data: &[u8]| graft_fuzz::run(&target, data));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "usage: graft-fuzz run TARGET FILE... | seeds DIR | afl TARGET (feature afl)\n\
                 targets: {}",
                graft_fuzz::TARGETS.join(", ")
            );
            ExitCode::FAILURE
        }
    }
}
