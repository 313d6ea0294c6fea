"""Benchmark grumpy against PyTorch (and JAX/Flax when installed): the same as `grumpy bench`.

    python benchmarks/bench.py [--quick] [--json FILE] [--sides grumpy,torch,jax]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from grumpy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
