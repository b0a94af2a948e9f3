"""Text-to-image sampling entry point.

Sampling lands with the pipeline and embedded-model issues; until then this says so and exits non-zero.
"""
import sys

if __name__ == "__main__":
    sys.exit("sample.py: sampling is not implemented yet (it lands with the pipeline and embedded-model issues).")
