#!/usr/bin/env bash
# Fuzzes the ingest's pure core with cargo fuzz (libFuzzer; the nightly toolchain):
#
#   bash tests/fuzz.sh [SECONDS] [TARGET...]     default: 30 s for each of every target
#
# Targets (fuzz/fuzz_targets/): body (webhook body decoding, validation, normalisation),
# tracking (Tracking API decoding: gzip, limits, batch merge, enrichment), naming (column names
# for key paths arriving in batches), load_plan (placing batches onto columns and overflow).
# The corpus in fuzz/corpus/<target> is kept in the repository (minimised with
# `cargo +nightly fuzz cmin <target>`); a crash is saved under fuzz/artifacts/<target>/ and the
# script fails. cargo-fuzz is installed from crates.io into tools/ when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(body tracking naming load_plan)

cargo_fuzz_version=0.13.2
tools=${SLUICE_TOOLS_DIR:-$PWD/tools}
if ! cargo fuzz --version >/dev/null 2>&1; then
  if [ ! -x "$tools/cargo-fuzz-$cargo_fuzz_version/bin/cargo-fuzz" ]; then
    cargo install --locked --quiet "cargo-fuzz@$cargo_fuzz_version" --root "$tools/cargo-fuzz-$cargo_fuzz_version"
  fi
  PATH="$tools/cargo-fuzz-$cargo_fuzz_version/bin:$PATH"
fi

cd fuzz
cargo +nightly fuzz build -O >&2
for target in "${targets[@]}"; do
  printf '== fuzz %s for %s s\n' "$target" "$seconds" >&2
  mkdir -p "corpus/$target"
  cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 2>&1 |
    grep -E '^(stat::number_of_executed_units|stat::new_units_added|==|SUMMARY|Done)|panicked|ERROR' >&2 || true
  # libFuzzer writes crash-*, leak-*, timeout-* files on failure.
  if compgen -G "artifacts/$target/*" >/dev/null; then
    printf 'fuzz: %s found a failing input: %s\n' "$target" "$(ls "artifacts/$target")" >&2
    exit 1
  fi
done
echo "fuzz: ${#targets[@]} passed, 0 failed"
