#!/usr/bin/env bash
# The first check on a GPU machine: one command, <= 8 minutes on one H100 / H200, everything also written to a log.
#
#   bash bench/gpu_smoke.sh                  # GPU; log: $SMOKE_DIR/gpu_smoke.log (SMOKE_DIR default: a new /tmp folder)
#   bash bench/gpu_smoke.sh --cpu            # the CPU-sized variant (tests/test_gpu_smoke.py runs it, < 1 min)
#   bash bench/gpu_smoke.sh --no-vllm        # skip the vLLM part even where vLLM is installed
#
# Parts: versions and device; the chunked loss vs the reference under bf16 autocast at V = 151,936 (loss, gradient,
# peak memory); packed vs padded passes of a small random Qwen3-shaped model (SDPA, bf16); train.py 2 steps in bf16
# on the HF path on that model, then a resume to step 3; bench/train_step.py on the Qwen3-4B shape (random weights)
# with MFU and peak memory per phase; where vLLM is installed, 2 steps through vLLM with --vllm_sync adapter,
# --vllm_sync merged and --vllm_sleep true. Nothing is downloaded: the models are random, the tokenizer is built
# here (bench/train_step.py --tokenizer builtin), the data is demo-arithmetic.
# Needs torch (CUDA), transformers, accelerate, peft, math-verify (+ its antlr4 runtime), pyyaml, tqdm. Missing
# pure-Python packages are installed from bench/wheels/ when that folder exists (fill it on a machine with internet:
#   pip download --no-deps -d bench/wheels peft math-verify latex2sympy2_extended "antlr4-python3-runtime==4.13.2"
# ~2 MB: small enough to travel with the working tree).
# Every part prints "[smoke] ..." lines; the last line says which parts failed. Exit status: the number of failed parts.
set -uo pipefail
cd "$(dirname "$0")/.."
CPU=0; VLLM=1
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    --no-vllm) VLLM=0 ;;
    *) echo "bench/gpu_smoke.sh: unknown argument $arg (use --cpu, --no-vllm)"; exit 2 ;;
  esac
done
OUT=${SMOKE_DIR:-$(mktemp -d /tmp/gpu_smoke.XXXXXX)}
mkdir -p "$OUT"
LOG="$OUT/gpu_smoke.log"
exec > >(tee -a "$LOG") 2>&1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
echo "[smoke] $(date -u '+%F %T') UTC; log $LOG; outputs in $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  | sed 's/^/[smoke] nvidia-smi: /'

if [ -d bench/wheels ] && ! $PY -c "import peft, math_verify" 2>/dev/null; then
  echo "[smoke] installing the carried wheels from bench/wheels/"
  $PY -m pip install --no-index --no-deps --find-links bench/wheels bench/wheels/*.whl -q
fi
if [ "$CPU" = 0 ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "[smoke] FAILED: torch.cuda.is_available() is False (driver too old for this torch's CUDA build?); --cpu for the CPU variant"
  exit 1
fi

FAILED=(); T0=$SECONDS
part() {  # part NAME COMMAND...: run, time, record a failure, go on
  local name=$1; shift
  local t=$SECONDS
  echo "[smoke] --- $name"
  if "$@"; then echo "[smoke] $name: ok ($((SECONDS - t)) s)"; else echo "[smoke] $name: FAILED ($((SECONDS - t)) s)"; FAILED+=("$name"); fi
}

if [ "$CPU" = 1 ]; then  # the same parts, sized for 2 CPU cores
  LOSS=(--V 4096 --H 64 --N 256 --chunk 64 --dtype bfloat16); DT=float32
  TRAIN=(--batch_size 2 --per_device_train_batch_size 1 --max_new_tokens 6); TINY=(--tiny)
  echo '{"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024,
         "max_position_embeddings": 2048, "tie_word_embeddings": true}' > "$OUT/bench_config.json"
  STEP=(--model_config "$OUT/bench_config.json" --batch_size 2 --per_device_train_batch_size 2 --max_new_tokens 4 --lora_r 4)
else
  LOSS=(--V 151936 --H 2560 --N 2048 --chunk 512 --dtype bfloat16); DT=bfloat16
  TRAIN=(--batch_size 8 --per_device_train_batch_size 4 --max_new_tokens 128); TINY=()
  STEP=(--model_config qwen3-4b --batch_size 8 --per_device_train_batch_size 4 --max_new_tokens 256)
fi
MODEL="$OUT/small-qwen3"
COMMON=(--model "$MODEL" --dataset demo-arithmetic --dtype "$DT" --max_prompt_length 1024 --lora_r 8 --lora_alpha 16
        --learning_rate 1e-4 --save_steps 1 "${TRAIN[@]}")

part versions $PY bench/gpu_smoke.py versions
part loss $PY bench/gpu_smoke.py loss "${LOSS[@]}"
part model $PY bench/gpu_smoke.py model --out "$MODEL" "${TINY[@]}"
part packed $PY bench/gpu_smoke.py packed --model "$MODEL" --dtype "$DT"
train_and_resume() {
  $PY train.py "${COMMON[@]}" --rollout_backend hf --max_steps 2 --output_dir "$OUT/run-hf" &&
  $PY train.py "${COMMON[@]}" --rollout_backend hf --max_steps 3 --output_dir "$OUT/run-hf" --resume_from_checkpoint latest &&
  $PY bench/gpu_smoke.py check_run --output_dir "$OUT/run-hf" --steps 3
}
part "train.py 2 steps + resume to 3 ($DT, HF rollouts)" train_and_resume
part "bench/train_step.py" $PY bench/train_step.py --random_init --tokenizer builtin --rollout_backend hf "${STEP[@]}" \
  --json "$OUT/train_step.json"

if [ "$CPU" = 0 ] && [ "$VLLM" = 1 ] && $PY -c "import vllm" 2>/dev/null; then
  for variant in "--vllm_sync adapter" "--vllm_sync merged" "--vllm_sync adapter --vllm_sleep true"; do
    name="vllm ${variant// /-}"
    run="$OUT/run-vllm${variant//[ -]/_}"
    # shellcheck disable=SC2086  # $variant: two or four words on purpose
    part "train.py 2 steps, vLLM $variant" bash -c "$PY -m accelerate.commands.launch --config_file \
      configs/accelerate/single_gpu.yaml train.py ${COMMON[*]} --rollout_backend vllm --gpu_memory_utilization 0.3 \
      --max_steps 2 --output_dir $run $variant && $PY bench/gpu_smoke.py check_run --output_dir $run --steps 2"
  done
else
  echo "[smoke] vLLM part skipped ($( [ "$CPU" = 1 ] && echo "--cpu" || { [ "$VLLM" = 0 ] && echo "--no-vllm" || echo "vllm not importable"; }))"
fi

if [ ${#FAILED[@]} -eq 0 ]; then
  echo "[smoke] all parts passed in $((SECONDS - T0)) s; log $LOG"
else
  echo "[smoke] ${#FAILED[@]} part(s) FAILED in $((SECONDS - T0)) s: ${FAILED[*]}; log $LOG"
fi
exit ${#FAILED[@]}
