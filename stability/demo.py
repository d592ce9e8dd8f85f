"""``make demo``: the suite's main job on the embedded data, end to end."""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import time  # noqa: E402

from .presets import get_preset  # noqa: E402
from .trunk import train_trunk  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Train the lenet300_mnist5k trunk with rewind checkpoints and print its summary."""
    parser = argparse.ArgumentParser(prog="python -m stability.demo")
    parser.add_argument("--out", default="results/demo", help="results root of the demo")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    cfg = get_preset("lenet300_mnist5k").with_overrides({"runtime.results_root": f"{args.out}/runs"})
    result = train_trunk(cfg)
    s = result.summary()
    print(f"trunk lenet300_mnist5k: test accuracy {s['final_test_accuracy']:.4f} after {s['final_step']}it")
    print(f"  checkpoints {', '.join(s['checkpoints'])} in {s['run_dir']}")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
