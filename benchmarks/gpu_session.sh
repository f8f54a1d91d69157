#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call of the device tool (repository root, its image's Python):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=580, carry=[".whl"])
#   (with benchmarks/gpu_wheels.sh run here first and carry=[".whl"], the harness tests run too)
# 1. benchmarks/gpu_check.py: the whole job, sequential onloading, CPU-vs-GPU agreement, retraining. Its
#    section on time and memory at 7B shapes is left out (measured on an H200 on 2026-12-04, RESULTS.md).
# 2. The test suite on CUDA: `device: auto` puts every job a test runs on the GPU. Left out: the tests that
#    need the embedded model (its files are over the transfer limit), and without .whl/ those that need
#    lm-eval (not in the image).
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

selection="not embedded and not harness"
if compgen -G ".whl/*.whl" > /dev/null &&
   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
   PYTHONPATH=src:/tmp/site python3 -c "import datasets, lm_eval.evaluator, scipy"; then
    export PYTHONPATH=src:/tmp/site
    selection="not embedded"
fi

timeout 270 python3 benchmarks/gpu_check.py --skip shapes 2>&1 | tee "$out/gpu_check.txt"
echo "gpu_check: exit ${PIPESTATUS[0]}" | tee -a "$out/gpu_check.txt"

echo "tests: -m '$selection'" | tee "$out/suite.txt"
# pytest-xdist is in the image; the tests keep their files under their own tmp_path
timeout 240 python3 -m pytest -q -m "$selection" -p no:cacheprovider -n 8 --durations 15 \
    --junitxml "$out/suite.xml" 2>&1 | tee -a "$out/suite.txt"
echo "suite: exit ${PIPESTATUS[0]}" | tee -a "$out/suite.txt"
