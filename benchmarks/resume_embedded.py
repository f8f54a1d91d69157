"""Resume after kill -9 on the embedded model: the default job (Wanda 50 % + attn-mlp reconstruction) on
`--samples` windows, once uninterrupted and once killed with SIGKILL as soon as its first checkpoint is
written, then continued with `--resume`. Prints the times and whether the two outputs' safetensors files
are byte for byte the same.

    PYTHONPATH=src python benchmarks/resume_embedded.py [--samples 32] [--threads 2] [prunelab run options]

Other options go to `prunelab run` (`--calib FILE --eval FILE` where the embedded text is not cached;
`--max-memory 0.1` streams the model block by block, as a model larger than memory would be).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command(out: Path, samples: int, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prunelab", "run", "--samples", str(samples), "--threads", str(threads),
            "--no-eval-dense", "--eval-windows", "8", "--out", str(out), *extra]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args, passed = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        whole, killed = Path(tmp) / "whole", Path(tmp) / "killed"
        start = time.perf_counter()
        subprocess.run(command(whole, args.samples, args.threads, *passed), check=True, capture_output=True)
        print(f"uninterrupted: {time.perf_counter() - start:.0f} s", flush=True)

        start = time.perf_counter()
        process = subprocess.Popen(command(killed, args.samples, args.threads, *passed), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        folder = killed.parent / f".{killed.name}.resume"
        while not list(folder.glob("state-*.json")):
            if process.poll() is not None:
                sys.exit("the run ended before its first checkpoint (more --samples?)")
            time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait()
        step = max(int(p.stem.split("-")[1]) for p in folder.glob("state-*.json"))
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"killed (SIGKILL) after {time.perf_counter() - start:.0f} s, checkpoint after submodel {step}; "
              f"checkpoint folder {size / 1e6:.0f} MB", flush=True)

        start = time.perf_counter()
        subprocess.run(command(killed, args.samples, args.threads, *passed, "--resume"), check=True,
                       capture_output=True)
        print(f"--resume: {time.perf_counter() - start:.0f} s; checkpoint folder left: {folder.exists()}")
        expected, got = digests(whole), digests(killed)
        print(f"{len(got)} safetensors file(s), byte for byte the same as the uninterrupted run's: {expected == got}")
        shutil.rmtree(whole, ignore_errors=True)


if __name__ == "__main__":
    main()
