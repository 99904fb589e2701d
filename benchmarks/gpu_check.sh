#!/usr/bin/env bash
# GPU check: every stage in bf16 on the realistic-size model, on this machine's GPUs.
#
#     bash benchmarks/gpu_check.sh            # STEPS=10 BATCH=8 SEQ=1024 by default
#     STEPS=5 BATCH=4 bash benchmarks/gpu_check.sh
#
# Without a GPU (no nvidia-smi, or it lists none) it says so in one line and exits 0.
# With one:
#   1. benchmarks/bench_scale.py --bf16 on GPU 0: the model of SmolLM2-135M's shape built in code
#      (random weights, nothing downloaded), sft / sft_varied / sft_packed / reward / dpo / ppo,
#      full fine-tuning and LoRA, gradient checkpointing off and on, ours and plain TRL side by
#      side: tokens/s, peak RSS, peak GPU memory (torch.cuda.max_memory_allocated) and MFU
#      (model FLOPs / the GPU's peak bf16 FLOPs; pass PEAK_TFLOPS=... for a GPU it does not know).
#   2. With more than one GPU: our stages on the same model and data under
#      `accelerate launch --config_file recipes/accelerate/<config> --num_processes <GPUs>`:
#      multi_gpu.yaml (sft, reward, dpo, ppo with LoRA), fsdp.yaml (sft, dpo; ppo and grpo with full
#      parameters, sharded by the RL loop's own FSDP2, alignment/sharding.py, with both
#      rl.generation_gather settings), and deepspeed_zero2.yaml (sft, dpo) when deepspeed is installed
#      (RL stages refuse DeepSpeed). Printed per run: tokens/s over all GPUs (steps/s from the
#      trainer, warm-up step included, x tokens per step; RL: episodes/s), the highest memory.used
#      nvidia-smi saw on any GPU, MFU, and for RL the parameter bytes each process held (summary).
#   3. With more than one GPU: benchmarks/bench_scale.py --fsdp on GPUs 0-1: ppo and grpo, FSDP2
#      against DDP, 2 processes: peak GPU memory and episodes/s.
# It trains a 135M model for a few steps per run: minutes on one recent GPU.
# No GPU has been available to this project yet: this script has not been run on one.
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 || [ -z "$(nvidia-smi -L 2>/dev/null)" ]; then
    echo "gpu_check: no GPU on this machine (nvidia-smi missing or lists none); nothing measured"
    exit 0
fi

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${STEPS:-10}
BATCH=${BATCH:-8}
SEQ=${SEQ:-1024}
WORK=${WORK:-/tmp/gpu_check}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: nvidia-smi sees a GPU but this Python's torch has no CUDA (install the default torch build)" >&2
    exit 1
fi
GPUS=$(nvidia-smi -L | wc -l)
echo "== $GPUS GPU(s):"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers, trl, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__, '| accelerate', accelerate.__version__)"

PEAK_ARG=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAK_ARG=(--peak-tflops "$PEAK_TFLOPS")

echo
echo "== 1. one GPU, bf16: ours vs plain TRL (benchmarks/bench_scale.py)"
CUDA_VISIBLE_DEVICES=0 $PY benchmarks/bench_scale.py --bf16 --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" \
    --work "$WORK" "${PEAK_ARG[@]}"

if [ "$GPUS" -lt 2 ]; then
    echo
    echo "== 2. multi-GPU configs: skipped (one GPU)"
    exit 0
fi

echo
echo "== 2. $GPUS GPUs: our stages under recipes/accelerate/*.yaml (bf16; batch $BATCH per GPU, seq $SEQ, $STEPS steps)"
HAVE_DS=0
$PY -c "import deepspeed" 2>/dev/null && HAVE_DS=1
# peak bf16 FLOPs of GPU 0, for MFU
PEAK=$($PY - "${PEAK_TFLOPS:-}" <<'EOF'
import sys, torch
table = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}
given = sys.argv[1]
name = torch.cuda.get_device_name(0)
print(given or next((str(v) for k, v in table.items() if k in name), ""))
EOF
)

run_one() {  # config stage variant
    local config=$1 stage=$2 variant=$3 out="$WORK/multi-$1-$2-$3${4:+-$4}" log="$WORK/multi-$1-$2-$3${4:+-$4}.log"
    local extra=(training.max_steps="$STEPS" training.per_device_train_batch_size="$BATCH" training.max_length="$SEQ")
    case $stage in
        sft) extra+=(data.source="$WORK/sft.jsonl") ;;
        reward) extra+=(data.source="$WORK/pairs.jsonl" data.eval_examples=0 reward.center_coef=0.0) ;;
        dpo) extra+=(data.source="$WORK/pairs.jsonl" data.eval_examples=0 dpo.loss_type=sigmoid dpo.beta=0.1) ;;
        ppo) extra=(reward_model="$WORK/reward" data.source="$WORK/prompts.jsonl" data.max_prompt_length=256
                    ppo.batch_size=$((BATCH * GPUS)) ppo.total_episodes=$((BATCH * GPUS * STEPS))
                    ppo.response_length=256 ppo.num_minibatches=1 ppo.missing_eos_penalty=null) ;;
        grpo) extra=(reward_model="$WORK/reward" reward_fn="[]" data.source="$WORK/prompts.jsonl" data.max_prompt_length=256
                     grpo.batch_size=$((BATCH * GPUS)) grpo.total_episodes=$((BATCH * GPUS * STEPS)) grpo.num_generations=2
                     grpo.response_length=256 grpo.num_minibatches=1 grpo.missing_eos_penalty=null) ;;
    esac
    [ -n "${4:-}" ] && extra+=("$stage.generation_gather=$4")
    [ "$variant" = lora ] && extra+=("lora={}")
    rm -rf "$out" "$out.partial"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$log.mem" &
    local smi=$!
    local rc=0
    accelerate launch --config_file "recipes/accelerate/$config" --num_processes "$GPUS" \
        "recipes/$stage.yaml" model="$WORK/policy" output_dir="$out" "report.models={}" data.num_examples=null \
        training.save_steps=0 training.logging_steps=1000 model_options.gradient_checkpointing=true \
        "${extra[@]}" > "$log" 2>&1 || rc=$?
    kill "$smi" 2>/dev/null || true
    wait "$smi" 2>/dev/null || true
    if [ "$rc" -ne 0 ]; then
        echo "  $config $stage $variant: FAILED (exit $rc); last lines of $log:"
        tail -5 "$log" | sed 's/^/    /'
        return 0
    fi
    $PY - "$out" "$log.mem" "$stage" "$variant" "$config" "$GPUS" "$BATCH" "$SEQ" "$STEPS" "$PEAK" <<'EOF'
import json, sys
out, mem, stage, variant, config, gpus, batch, seq, steps, peak = sys.argv[1:]
gpus, batch, seq, steps = int(gpus), int(batch), int(seq), int(steps)
summary = json.load(open(f"{out}/run_info.json"))["summary"]
used = [int(x) for x in open(mem).read().split() if x.isdigit()]
params = 134_515_008
if stage in ("ppo", "grpo"):
    rows = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if "objective/kl" in l]
    t = rows[-1]["time"] - rows[0]["time"] if len(rows) > 1 else float("nan")
    eps = (len(rows) - 1) * batch * gpus / t
    line = f"{eps:9.2f} episodes/s ({eps * 512:9.0f} tokens/s)"
    mfu = (f", {summary.get('distributed', '?')}: {summary.get('trained_parameter_bytes_per_process', 0) / 2**30:.2f} GiB "
           f"trained + {summary.get('frozen_parameter_bytes_per_process', 0) / 2**30:.2f} GiB frozen parameters per process")
else:
    per_step = batch * gpus * seq * (2 if stage in ("reward", "dpo") else 1)  # a pair is two sequences
    tps = summary["steps_per_second"] * per_step
    line = f"{tps:9.0f} tokens/s"
    fpt = (4 if variant == "lora" else 6) * params + 6 * 30 * seq * 576 + (2 * params if stage == "dpo" else 0)
    mfu = f", MFU {tps * fpt / (gpus * float(peak) * 1e12):.1%}" if peak else ", MFU n/a (set PEAK_TFLOPS)"
print(f"  {config:<20} {stage:<6} {variant:<4} {line}, peak memory.used {max(used) if used else float('nan'):.0f} MiB per GPU{mfu}")
EOF
}

for stage in sft reward dpo; do
    for variant in full lora; do run_one multi_gpu.yaml "$stage" "$variant"; done
done
run_one multi_gpu.yaml ppo lora
for stage in sft dpo; do run_one fsdp.yaml "$stage" full; done
for stage in ppo grpo; do
    for gather in full layer; do run_one fsdp.yaml "$stage" full "$gather"; done
done
if [ "$HAVE_DS" = 1 ]; then
    for stage in sft dpo; do run_one deepspeed_zero2.yaml "$stage" full; done
else
    echo "  deepspeed_zero2.yaml: skipped (deepspeed not installed: pip install deepspeed)"
fi
echo "(multi-GPU tokens/s from the trainer's steps/s, which includes the first step; logs in $WORK/multi-*.log)"

echo
echo "== 3. GPUs 0-1: ppo and grpo, FSDP2 against DDP (benchmarks/bench_scale.py --fsdp, bf16)"
CUDA_VISIBLE_DEVICES=0,1 $PY benchmarks/bench_scale.py --fsdp --bf16 --steps "$STEPS" --batch "$BATCH" --work "$WORK"
