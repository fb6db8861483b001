#!/usr/bin/env bash
# The GPU measurements of the performance issue, most important first, in one device call.
#
#   bench/gpu_session.sh [PART] [BUDGET_S]      # PART 1 (default), 2, 3 or 4; BUDGET_S default 540
#
# Every run is one `python3 bench/...` invocation with its own time limit, cut to what is left
# of BUDGET_S (a run that cannot get 60 s is skipped and says so), so the script ends inside
# one device call (10 min) whatever hangs. JSON lines go to $OUT/<name>.jsonl (OUT defaults to
# bench/out), one status line per run to stdout and $OUT/session.log, and at the end every
# run's stderr to $OUT/stderr.txt (one file: the device tool brings back at most 8). Needs
# only what the GPU image has: jax (CUDA), flax, optax; no gin, clu or TensorFlow. Record what
# comes back in bench/RESULTS.md with the device, command and date.
#
# Part 1: the issue's targets at their expected best configuration (cuDNN attention where it
#   applies, "auto"; for large and xl remat "dots" and a chunked loss: the trace estimates put
#   large's activations at 8 GiB, inside the 23 GiB target with the weights and the
#   composition's state, without recomputing any matmul), the fine-tune step beside each
#   composed one, and composed vs anchor-alone decoding in both layouts (per-layer, the
#   default, and stacked), with each layout's compiled copies (`step_copies`).
# Part 2: what each optimisation is worth: XLA vs cuDNN attention, remat full against part
#   1's dots, decoding at batch 1 and 64, and XLA's flop count of the small step.
# Part 3 (after parts 1 and 2 ran on an H200, 2026-12-04): where the large composed step's
#   time goes (bench/profile_step.py), the large composed step without remat and without the
#   chunked loss (each against part 1's dots + loss_chunk 512), decoding with the while loop in
#   a CUDA graph (XLA's WHILE and CONDITIONAL command buffers), and the small step's flop count
#   (which failed in part 2).
# Part 4 (for the next GPU session), most important first: the large step in both modes (the
#   composed/fine-tune ratio) with remat "dots_attention" (cuDNN's attention forward no longer
#   run again in the backward pass) and the chunked loss that no longer runs the output layer
#   twice; the large composed step with the frozen models per layer (the trainer's
#   frozen_layout="per_layer": compiled for an H100 on a CPU, bench/gpu_aot.py, it writes a
#   third of the stacked layout's copy bytes); decoding with fused projections and the
#   known-trip-count loop (no eos_id), then the same with XLA's concurrent command-buffer
#   scheduling (the composed step's dependency chain is about half its kernel count: the
#   augmenting model's layers may run beside the anchor's lower ones); the large step with
#   "dots" (what the policy is worth); the large step without the chunked loss; the profile
#   with command buffers off (kernels named by HLO op, so its "bandwidth" field gives each
#   memory-bound kernel's achieved TB/s); the small step with "dots_attention";
#   decoding without both decoding changes (as in part 1, on this machine); the layer scans
#   unrolled; the small step's flop count. About 10 minutes of runs: the last are skipped for
#   the budget (session.log says so). (XLA's dynamic-slice fusion, once in this list, is out:
#   compiled for an H100 it changes nothing in the composed step.)
#
# If a run fails with cuDNN named in its error (the end of its stderr; not a timeout or an
# out-of-memory error), the runs after it that do not set --attention_impl themselves get
# --attention_impl xla (and session.log says so), so one cuDNN problem on the GPU image does
# not cost the rest of the call.
#
# TINY=1 bench/gpu_session.sh [PART] [BUDGET_S] checks the script on any machine before device
# time is spent on it: the same runs with the same flags, but every model at the tiny shape
# (`--shape tiny`, `decode.py --tiny`), output in bench/out/tiny, and the packages the GPU image
# lacks (gin, clu, TensorFlow, seqio, TFDS) made unimportable, as they are there. Its timings mean
# nothing; it is there to find a run that fails or prints no JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-1}
BUDGET=${2:-540}
TINY=${TINY:-0}
if [[ $TINY == 1 ]]; then
  OUT=${OUT:-bench/out/tiny}
  BLOCKED=$(mktemp -d)
  trap 'rm -rf "$BLOCKED"' EXIT
  # Python imports sitecustomize from the path at start-up: None in sys.modules makes an import
  # raise ImportError, as for a package that is not installed.
  printf 'import sys\nfor _m in ("gin", "clu", "tensorflow", "seqio", "tensorflow_datasets"):\n    sys.modules[_m] = None\n' \
    >"$BLOCKED/sitecustomize.py"
  export PYTHONPATH="$BLOCKED${PYTHONPATH:+:$PYTHONPATH}"
else
  OUT=${OUT:-bench/out}
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}
END=$((SECONDS + BUDGET))
CUDNN_FAILED=0

cudnn_error() {  # cudnn_error ERR_FILE OFFSET: did the error written after OFFSET name cuDNN?
  # The error is at the end (Python prints the exception last); cuDNN named in earlier log
  # lines proves nothing, and an out-of-memory report may list cuDNN's fused-attention buffers.
  local new
  new=$(tail -c +$(($2 + 1)) "$1")
  ! grep -qiE 'RESOURCE_EXHAUSTED|out of memory' <<<"$new" \
    && tail -n 20 <<<"$new" | grep -qi cudnn
}

run() {  # run NAME LIMIT_S SCRIPT ARGS...
  local name=$1 limit=$2
  shift 2
  local args=("$@")
  if [[ $TINY == 1 ]]; then  # every --shape X becomes --shape tiny; decode.py gets --tiny
    local i
    for i in "${!args[@]}"; do
      ((i > 0)) && [[ ${args[i - 1]} == --shape ]] && args[i]=tiny
    done
    [[ ${args[0]} == bench/decode.py ]] && args+=(--tiny)
  fi
  if [[ $CUDNN_FAILED == 1 && " ${args[*]} " != *" --attention_impl "* ]]; then
    args+=(--attention_impl xla)
  fi
  local left=$((END - SECONDS - 5))
  ((left < limit)) && limit=$left
  if ((limit < 60)); then
    echo "skipped (budget): $name ${args[*]}" | tee -a "$OUT/session.log"
    return
  fi
  local start=$SECONDS err_bytes rc
  err_bytes=$(stat -c %s "$OUT/$name.err" 2>/dev/null || echo 0)
  timeout "$limit" python3 "${args[@]}" >>"$OUT/$name.jsonl" 2>>"$OUT/$name.err"
  rc=$?
  echo "rc=$rc ${limit}s-limit $((SECONDS - start))s: $name ${args[*]}" | tee -a "$OUT/session.log"
  if ((rc != 0 && rc != 124 && rc != 137)) && [[ $CUDNN_FAILED == 0 ]] \
      && cudnn_error "$OUT/$name.err" "$err_bytes"; then
    CUDNN_FAILED=1
    echo "cuDNN failed in $name: the runs that follow use --attention_impl xla" \
      | tee -a "$OUT/session.log"
  fi
}

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; } \
  >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
# The xl runs must show that an 8B-shape composition trains on one 80 GB H100 (81,559 MiB) on
# whatever card this is (an H200 has 141 GB): their allocator is capped at that size.
TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
XL_FRACTION=$(python3 -c "t = float('${TOTAL_MIB:-0}'.strip() or 0)
print(round(min(.95, 81559 / t), 3) if t > 0 else .95)")
echo "xl allocator fraction: $XL_FRACTION of ${TOTAL_MIB:-?} MiB" | tee -a "$OUT/session.log"

case "$PART" in
1)
  run small 150 bench/train_step.py --shape small --no_hlo_flops
  run decode 150 bench/decode.py --batches 8
  run large 180 bench/train_step.py --shape large --remat dots --loss_chunk 512 --no_hlo_flops
  XLA_PYTHON_CLIENT_MEM_FRACTION=$XL_FRACTION run xl 180 bench/train_step.py --shape xl \
    --modes compose --remat dots --loss_chunk 512 --no_hlo_flops --steps 3 --warmup 1
  run small 150 bench/train_step.py --shape small --remat dots --loss_chunk 512 --no_hlo_flops
  ;;
2)
  run small 150 bench/train_step.py --shape small --attention_impl xla --no_hlo_flops
  run small 150 bench/train_step.py --shape small --remat full --loss_chunk 512 --no_hlo_flops
  run large 180 bench/train_step.py --shape large --remat full --loss_chunk 512 --no_hlo_flops
  XLA_PYTHON_CLIENT_MEM_FRACTION=$XL_FRACTION run xl 180 bench/train_step.py --shape xl \
    --modes compose --remat full --loss_chunk 512 --no_hlo_flops --steps 3 --warmup 1
  run decode 150 bench/decode.py --batches 1,64
  run small 150 bench/train_step.py --shape small --modes compose --steps 3
  ;;
3)
  run profile 90 bench/profile_step.py --shape large --remat dots --loss_chunk 512 --top 30
  run large 70 bench/train_step.py --shape large --modes compose --loss_chunk 512 \
    --no_hlo_flops --steps 5 --warmup 2
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    run decode 90 bench/decode.py --batches 8 --layouts per_layer
  run large 70 bench/train_step.py --shape large --modes compose --remat dots \
    --no_hlo_flops --steps 5 --warmup 2
  run small 90 bench/train_step.py --shape small --modes compose --steps 3
  ;;
4)
  run large 120 bench/train_step.py --shape large --remat dots_attention --loss_chunk 512 \
    --no_hlo_flops
  run large 150 bench/train_step.py --shape large --modes compose --remat dots_attention \
    --loss_chunk 512 --frozen_layout per_layer --no_hlo_flops --steps 5 --warmup 2
  run decode 90 bench/decode.py --batches 8 --layouts per_layer --profile
  XLA_FLAGS="--xla_gpu_command_buffer_scheduling_mode=CONCURRENT" run decode 90 \
    bench/decode.py --batches 8 --layouts per_layer --profile
  run large 120 bench/train_step.py --shape large --remat dots --loss_chunk 512 --no_hlo_flops
  run large 120 bench/train_step.py --shape large --remat dots_attention --no_hlo_flops
  XLA_FLAGS="--xla_gpu_enable_command_buffer=" run profile 90 bench/profile_step.py \
    --shape large --remat dots_attention --loss_chunk 512 --top 30
  run small 90 bench/train_step.py --shape small --remat dots_attention --loss_chunk 512 \
    --no_hlo_flops
  run decode 90 bench/decode.py --batches 8 --layouts per_layer --no_fuse --early_stop --profile
  run large 150 bench/train_step.py --shape large --modes compose --remat dots_attention \
    --loss_chunk 512 --unroll_layers --no_hlo_flops --steps 5 --warmup 2
  run small 90 bench/train_step.py --shape small --modes compose --steps 3
  ;;
*)
  echo "PART: expected 1, 2, 3 or 4, got $PART" >&2
  exit 2
  ;;
esac
# Each run's stderr into one file, so that $OUT holds at most 4 JSON files and 3 others.
for err in "$OUT"/*.err; do
  [[ -e $err ]] || continue
  echo "== $(basename "$err" .err)"
  cat "$err"
done >>"$OUT/stderr.txt"
rm -f "$OUT"/*.err
