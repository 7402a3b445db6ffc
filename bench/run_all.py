"""Kept for old habits: ``python bench/run_all.py [args]`` is ``llmkern bench [args]`` (llmkern/bench.py)."""
import sys

from llmkern.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
