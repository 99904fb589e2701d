#!/usr/bin/env bash
# Wall time of the main job from a clean run directory: init -> pretrain -> sft -> dpo -> report.
# Usage: bash benchmarks/main_job.sh      (target: under 3 minutes on 2 CPU cores)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$repo/recipes" "$work/recipes"
cd "$work"
start=$(python -c 'import time; print(time.time())')
accelerate launch recipes/dpo.yaml > main_job.log 2>&1 || { tail -20 main_job.log; exit 1; }
end=$(python -c 'import time; print(time.time())')
sed -n '/^Gold score/,/^$/p' main_job.log
grep -E '^\[[a-z]+\] done' main_job.log | sed -E 's/done: .*wall_seconds=([0-9.]+).*/stage seconds \1/'
python -c "w = $end - $start; print(f'main job wall time: {w:.1f} s; {w / 180:.2f} of the 3-minute budget')"
