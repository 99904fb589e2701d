#!/usr/bin/env bash
# Wall time of a whole recipe chain from a clean run directory, as a user types it.
# Usage: bash benchmarks/main_job.sh [RECIPE] [OVERRIDES...]
#   bash benchmarks/main_job.sh                      the main job, recipes/dpo.yaml: init -> pretrain
#                                                    -> sft -> dpo -> report (target: under 3 minutes)
#   bash benchmarks/main_job.sh ppo.yaml '*:seed=1'  init -> pretrain -> sft -> reward -> ppo -> report
#                                                    (target: under 10 minutes), on another seed
# on 2 CPU cores. Prints the closing table, each stage's seconds and the share of the budget.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
recipe="${1:-dpo.yaml}"
shift || true
case "$recipe" in ppo.yaml) budget=600 ;; *) budget=180 ;; esac
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$repo/recipes" "$work/recipes"
cd "$work"
start=$(python -c 'import time; print(time.time())')
accelerate launch "recipes/$recipe" "$@" > main_job.log 2>&1 || { tail -20 main_job.log; exit 1; }
end=$(python -c 'import time; print(time.time())')
sed -n '/^Gold score/,/^$/p; /^Greedy replies/,/^$/p' main_job.log
grep -E '^\[[a-z]+\] done' main_job.log | sed -E 's/^\[([a-z]+)\] done: .*wall_seconds=([0-9.]+).*/\1 seconds \2/'
python -c "w = $end - $start; print(f'recipes/$recipe wall time: {w:.1f} s; {w / $budget:.2f} of the {$budget // 60}-minute budget')"
