"""What a full garbage collection costs a serving replica: the pause, with the engine's start-up objects scanned
(the collector's default) and frozen (what serving/generation.py's Engine does after its warm-up).

A full collection holds the interpreter lock while it scans every tracked object, so the decoding thread and
every request it runs wait that long. The engine's model, the libraries and, with compile, Inductor's code
live as long as the engine: frozen, they are never scanned.

    python bench/gc_pause.py [MODEL] [--compile]      # MODEL: default models/base (make run's base model)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pause_ms() -> float:
    start = time.perf_counter()
    gc.collect()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    from serving.generation import Engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="models/base")
    parser.add_argument("--compile", action="store_true", help="the engine with its decode step and prefill "
                                                               "compiled (serving.compile_decode)")
    args = parser.parse_args()
    engine = Engine(args.model, "alpaca", 64, 512, max_batch_size=8, compile=args.compile)
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    scanned = pause_ms()
    gc.freeze()
    print(f"{args.model} (compile: {args.compile}): {frozen} objects frozen at start; a full collection "
          f"{scanned:.1f} ms with them scanned, {pause_ms():.1f} ms frozen", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
