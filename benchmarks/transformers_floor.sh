#!/usr/bin/env bash
# The tests on the oldest transformers pyproject.toml allows (5.17.0, also the GPU machine's image), beside the
# newer one .ci/run installs: the floor's wheel and the two packages it needs in older versions (huggingface-hub
# below 2, httpx) go into /tmp/transformers-floor and come first on PYTHONPATH. Run from the repository root
# with .venv active; arguments go to pytest (default: the whole suite, two workers).
#   bash benchmarks/transformers_floor.sh                           # 847 passed, 2 skipped on 2026-12-08
#   bash benchmarks/transformers_floor.sh tests/test_quantized.py   # one file
set -euo pipefail
floor=${TRANSFORMERS_FLOOR:-5.17.0}
site=/tmp/transformers-floor/$floor
if [ ! -d "$site/transformers" ]; then
    python -m pip install -q --no-deps --target "$site" "transformers==$floor" "huggingface-hub>=1.5,<2" httpx \
        httpcore anyio h11 sniffio
fi
PYTHONPATH="$site" python -c "import transformers; print('transformers', transformers.__version__)"
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-n 2 --dist worksteal)
PYTHONPATH="$site" python -m pytest -q -p no:cacheprovider "${args[@]}"
