"""Measure the peak allocated bytes of real training steps for each config given (rayft.measure), in
this process: its own one-rank process group and profiler. Run by tests/test_estimate.py in a
subprocess; prints one JSON line per config: {"index", "peak_bytes", "loaded_bytes", "left_bytes"}."""

from __future__ import annotations

import json
import sys


def main(configs_file: str) -> None:
    from rayft.config import parse_config
    from rayft.measure import measure_peak

    for index, raw in enumerate(json.loads(open(configs_file).read())):
        cfg = parse_config(raw)
        measured = measure_peak(cfg, cfg.model.name_or_path, steps=2)  # ZeRO-3 reaches its steady state in the second
        print(json.dumps({"index": index, "peak_bytes": measured.peak_bytes, "loaded_bytes": measured.loaded_bytes,
                          "left_bytes": measured.left_bytes}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
