#!/usr/bin/env bash
# The packages the GPU machine's image lacks for the tests marked `harness` (lm-eval and what it imports),
# for the hub loaders (datasets) and for `permute` (scipy: 35 MB; 46 MB in all, of the 64 MiB the device
# tool carries), as wheels for its Python 3.12, into .whl/ (ignored by git; the device tool carries it:
# run(..., carry=[".whl"])). benchmarks/gpu_session.sh installs them when present.
# The versions are those CI tests with (pip freeze of .ci/run's environment, 2026-12-05).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest" .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 evaluate==0.4.6 \
    more-itertools==11.2.1 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
    tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4 scipy==1.18.1
# published as source only, and pure Python: built here
python3 -m pip wheel -q --no-deps -w "$dest" sqlitedict==2.1.0 word2number==1.1 rouge_score==0.1.2
du -sh "$dest"
