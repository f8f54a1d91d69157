#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call of the device tool (repository root, its image's Python):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=580)
# 1. benchmarks/gpu_check.py: CPU-vs-GPU agreement, time and memory at real shapes, sequential onloading.
# 2. The test suite on CUDA: `device: auto` puts every job a test runs on the GPU. Left out: the tests that
#    need the embedded model (its files are over the transfer limit) or lm-eval (not in the image).
# Each step has its own time limit, so the first cannot eat the second's; the logs come back from $OUT.
# Record what they say in docs/RESULTS.md ("GPU").
set -uo pipefail
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1 PRUNELAB_CACHE=/tmp/prunelab-cache

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft, accelerate as a; print('python', __import__('sys').version.split()[0],
'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft',
peft.__version__, 'accelerate', a.__version__)"
} 2>&1 | tee "$out/versions.txt"

timeout 330 python3 benchmarks/gpu_check.py 2>&1 | tee "$out/gpu_check.txt"
echo "gpu_check: exit ${PIPESTATUS[0]}" | tee -a "$out/gpu_check.txt"

# pytest-xdist is in the image; the tests keep their files under their own tmp_path
timeout 200 python3 -m pytest -q -m "not embedded and not harness" -p no:cacheprovider -n 8 --durations 15 \
    --junitxml "$out/suite.xml" 2>&1 | tee "$out/suite.txt"
echo "suite: exit ${PIPESTATUS[0]}" | tee -a "$out/suite.txt"
