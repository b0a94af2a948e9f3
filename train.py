"""Training entry point.

Training lands with the training issue; until then this says so and exits non-zero.
"""
import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet (it lands with the training issue).")
