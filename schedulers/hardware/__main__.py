"""`python -m schedulers.hardware`: measure this CPU's GEMM FLOP/s and copy bandwidth, beside the registered "cpu"
profile's figures (`measure_cpu_profile`)."""

import sys

from schedulers.hardware import HARDWARE, measure_cpu_profile


def main(argv: list[str]) -> None:
    if len(argv) > 1:  # no flags: refuse them rather than ignore them
        sys.exit(f"python -m schedulers.hardware takes no arguments (it measures this CPU), got {argv[1:]}")
    m = measure_cpu_profile()
    print(f"cpu GEMM: {m['peak_flops'] / 1e9:.1f} GFLOP/s   copy bandwidth: {m['mem_bandwidth'] / 1e9:.2f} GB/s")
    p = HARDWARE.get("cpu")
    print(f"registered cpu profile: {p.peak_flops / 1e9:.1f} GFLOP/s, {p.hbm_bandwidth / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main(sys.argv)
