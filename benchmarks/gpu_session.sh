#!/usr/bin/env bash
# Every measurement and test that needs a GPU, in one call on a lent device machine.
#
# The device image has torch, transformers, safetensors, typer, tqdm and pytest but not pydantic,
# so its wheels travel with the working tree (for the image's Python 3.12):
#   here, once:      bash benchmarks/gpu_session.sh --fetch-wheels
#   on the device:   bash benchmarks/gpu_session.sh            (device tool: carry [".whl"])
# Logs and JSON land in $OUT (the device tool brings them back), else in ./gpu-results.
# Each step is bounded so the whole call stays inside one 10-minute device command.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  exit
fi

out="${OUT:-gpu-results}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import pydantic" 2>/dev/null || { echo "pydantic missing: run --fetch-wheels here and carry .whl"; exit 1; }

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
status=0
step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [[ $rc == 0 ]] || status=1
}
step pytest-gpu 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gptq.py tests/test_engine.py tests/test_qlinear.py
step quantize_speed 300 python3 benchmarks/quantize_speed.py --json "$out/quantize_speed.json"
step decode_speed 150 python3 benchmarks/decode_speed.py --json "$out/decode_speed.json"
exit $status
