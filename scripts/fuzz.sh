#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) under AFL++ for SECONDS each and prints, per
# target, the executions, crashes and hangs. Crashes and hangs found are copied into
# fuzz/regressions/<target>/, which the normal test suite replays (fuzz/tests/regressions.rs).
#
#   scripts/fuzz.sh 60                 # every target, 60 s each
#   scripts/fuzz.sh 3600 gguf http_body
#
# Needs cargo-afl (installed here on first use: `cargo install cargo-afl --version 0.18.2`,
# then `cargo afl config --build`). Findings are minimised by nothing: the raw input is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
if ! cargo afl --version >/dev/null 2>&1; then
    cargo install cargo-afl --version 0.18.2 --locked
    cargo afl config --build
fi
export CARGO_TARGET_DIR=target/afl
cargo afl build --release -p graft-fuzz --features afl
bin=target/afl/release/graft-fuzz

if [ $# -eq 0 ]; then
    mapfile -t targets < <(ls fuzz/corpus)
else
    targets=("$@")
fi

out=${GRAFT_FUZZ_OUT:-/tmp/graft-fuzz}
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
export AFL_NO_AFFINITY=1

printf '%-16s %12s %10s %8s %8s %8s\n' target execs execs/s paths crashes hangs
total_crashes=0
for t in "${targets[@]}"; do
    rm -rf "$out/$t"
    mkdir -p "$out/$t"
    # -t: an input slower than 1 s is a hang; -m none: the allocation bound is graft-fuzz's own
    # (fuzz/src/alloc.rs aborts over 256 MiB in one allocation).
    cargo afl fuzz -i "fuzz/corpus/$t" -o "$out/$t" -V "$secs" -t 1000 -m none \
        -- "$bin" afl "$t" >"$out/$t.log" 2>&1 || {
        echo "$t: afl-fuzz failed; see $out/$t.log" >&2
        tail -20 "$out/$t.log" >&2
        exit 1
    }
    stats="$out/$t/default/fuzzer_stats"
    get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
    printf '%-16s %12s %10s %8s %8s %8s\n' "$t" "$(get execs_done)" "$(get execs_per_sec)" \
        "$(get corpus_count)" "$(get saved_crashes)" "$(get saved_hangs)"
    for kind in crashes hangs; do
        for f in "$out/$t/default/$kind"/id:*; do
            [ -e "$f" ] || continue
            mkdir -p "fuzz/regressions/$t"
            name="$kind-$(sha256sum "$f" | cut -c1-16)"
            cp "$f" "fuzz/regressions/$t/$name"
            total_crashes=$((total_crashes + 1))
        done
    done
done
if [ "$total_crashes" -gt 0 ]; then
    echo "$total_crashes finding(s) copied into fuzz/regressions/; replay one with:"
    echo "  cargo run --release -p graft-fuzz -- run TARGET fuzz/regressions/TARGET/FILE"
    exit 1
fi
echo "0 crashes, 0 hangs"
