#!/usr/bin/env bash
# One batched GPU check (about 7 minutes of limits): the GPU end-to-end and KV transfer tests,
# the disaggregated TTFT breakdown on a Llama-3-8B-shaped model, bench/kv_transfer.py and the
# copy kernel's tests. Run it with the device tool, carrying .whl and .gpu (README, Notes);
# JSON results and logs land in $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/proto PATH=$PWD/.gpu/bin:$PATH LD_LIBRARY_PATH=$PWD/.gpu/lib PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/e2e/test_gpu_e2e.py tests/kvtransfer \
  --ignore=tests/kvtransfer/test_tcp_tls.py > "$OUT/pytest_transfer.txt" 2>&1 || status=1
tail -8 "$OUT/pytest_transfer.txt"
timeout 150 python3 -m bench.disagg_ttft --shape llama3-8b --device cuda --dtype bfloat16 \
  --prompt-lens 128 2048 8184 --repeats 2 --kv-cache-memory-gb 8 --kv-transport auto --compare-whole \
  --out "$OUT/disagg_ttft_h200.json" || status=1
timeout 90 python3 -m bench.kv_transfer --iters 5 --out "$OUT/kv_transfer_h200.json" || status=1
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kv_copy.py > "$OUT/pytest_kv_copy.txt" 2>&1 || status=1
tail -3 "$OUT/pytest_kv_copy.txt"
exit $status
