#!/usr/bin/env bash
# Every test and measurement that needs a GPU, in one call of at most 8 minutes on one GPU,
# written to one JSON ($OUT/gpu-session.json; the device tool brings $OUT back):
#   1. device    what quantshift chooses on this GPU and why (as `quantshift device` prints it)
#   2. pytest    `pytest -m gpu` over every test file with a gpu test
#   3. kernels   int4 (tinygemm) / int8 (_int_mm) / fp8 (_scaled_mm) kernels against the fake-quant
#                reference on Llama-2-7B linear shapes, error and time (benchmarks/gpu_kernels.py)
#   4. gptq      GPTQ seconds per Llama-2-7B-shaped layer, 128 x 2048 calibration tokens, synthetic
#                weights, peak memory, against llm-compressor's 7.28 s per layer on an H100
#                (benchmarks/quantize_speed.py)
#   5. decode    batch-1 decode tok/s of a Llama-2-7B-shaped W4 g128 model (and fp16) as a fraction
#                of the copy-bandwidth bound (benchmarks/decode_speed.py)
#   6. ltm       an 8 GB synthetic bf16 model (7B shapes, 18 blocks) quantized RTN and GPTQ W4, saved,
#                reloaded packed and scored under caps of 6 GiB host, 4 GiB device: peak device memory
#                (benchmarks/larger_than_memory.py --device cuda)
# Each step has a time limit; the limits add up to 535 s.
#
#   bash benchmarks/gpu_session.sh --dry-run     # on a CPU: the plan, then every step small (< 1 min)
#   bash benchmarks/gpu_session.sh               # on the GPU machine (device tool: carry [".whl", ".gpucarry"])
#   bash benchmarks/gpu_session.sh --only pytest,ltm   # some steps (a rerun after a fix)
#   bash benchmarks/gpu_session.sh --fetch-wheels   # here, once: pydantic wheels and the tokenizer
#
# The device image has torch, transformers, safetensors, accelerate, typer, tqdm and pytest but not
# pydantic, so its wheels travel with the working tree (for the image's Python 3.12); nor the bundled
# model's packages, so the SmolLM2 tokenizer files travel in .gpucarry/tokenizer. $PYTHON picks the
# interpreter (default python3). Logs and JSON land in $OUT, else in ./gpu-results.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 || exit 1
  tok=$("${PYTHON:-.venv/bin/python}" -c 'from quantshift.models.bundled import bundled_checkpoint as b; print(b("smollm2-135m"))') || exit 1
  mkdir -p .gpucarry/tokenizer
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    [[ -f "$tok/$f" ]] && cp "$tok/$f" .gpucarry/tokenizer/
  done
  exit
fi
dry=0
only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --only) only="${2:-}"; shift ;;
    *) echo "error: unknown option $1; allowed: --dry-run, --only STEP[,STEP], --fetch-wheels" >&2; exit 2 ;;
  esac
  shift
done
for name in ${only//,/ }; do
  [[ " device pytest kernels gptq decode ltm " == *" $name "* ]] || {
    echo "error: --only $name: no such step (device, pytest, kernels, gptq, decode, ltm)" >&2; exit 2; }
done

PY="${PYTHON:-python3}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
if [[ $dry == 0 ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import pydantic" 2>/dev/null || { echo "pydantic missing: run --fetch-wheels here and carry .whl"; exit 1; }
gpu_tests=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')

if [[ $dry == 1 ]]; then
  mode="dry-run (CPU, every step small: checks the session runs, measures nothing)"
  device=cpu
  kernels=(--small --device cpu)
  gptq=(--tiny --device cpu --nsamples 2 --seqlen 64 --methods gptq)
  decode=(--tiny --device cpu --steps 2 --repeats 1 --prompt 4 --copy-mib 16)
  ltm=(--params 2e7 --hidden 256 --intermediate 688 --heads 4 --kv-heads 4 --device cpu --max-memory cpu=4GiB)
  tokenizer=()
else
  mode="GPU"
  device=cuda
  kernels=(--device cuda)
  gptq=(--device cuda --layers 2 --nsamples 128 --seqlen 2048 --methods gptq)
  decode=(--device cuda --steps 64 --repeats 3)
  ltm=(--params 4e9 --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32 --device cuda
       --max-memory cpu=6GiB,cuda:0=4GiB)
  tokenizer=(--tokenizer .gpucarry/tokenizer)
fi
# name | time limit (s) | command
plan=(
  "device|20|$PY benchmarks/gpu_session_summary.py --device $device"
  "pytest|80|$PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors $gpu_tests"
  "kernels|45|$PY benchmarks/gpu_kernels.py ${kernels[*]} --json $out/kernels.json"
  "gptq|80|$PY benchmarks/quantize_speed.py ${gptq[*]} --json $out/gptq.json"
  "decode|90|$PY benchmarks/decode_speed.py ${decode[*]} --json $out/decode.json"
  "ltm|220|$PY benchmarks/larger_than_memory.py ${ltm[*]} ${tokenizer[*]} --ppl docs/memory.md --stages generate,quantize-rtn,quantize-gptq,ppl --workdir /tmp/quantshift-ltm --json $out/ltm.json"
)
if [[ -n "$only" ]]; then
  kept=()
  for step in "${plan[@]}"; do
    [[ ",$only," == *",${step%%|*},"* ]] && kept+=("$step")
  done
  plan=("${kept[@]}")
fi
echo "gpu session: $mode; output $out/gpu-session.json"
for step in "${plan[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  printf '  plan: %-8s <= %4ss  %s\n' "$name" "$limit" "$cmd"
done
[[ $dry == 0 ]] && { nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true; }

: > "$out/steps.tsv"
status=0
for step in "${plan[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  echo "== $name"
  t0=$(date +%s%N)
  # shellcheck disable=SC2086  # the command is a word list on purpose
  timeout "$limit" $cmd > "$out/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  tail -n 25 "$out/$name.log"
  echo "== $name: exit $rc"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( (t1 - t0) / 1000000 ))" "$limit" >> "$out/steps.tsv"
  [[ $rc == 0 ]] || status=1
done
"$PY" benchmarks/gpu_session_summary.py --out "$out" --mode "$([[ $dry == 1 ]] && echo dry-run || echo gpu)" || status=1
exit $status
