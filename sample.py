"""Sample images from a latent diffusion model (the embedded captioned-shapes model by default).

    python sample.py --prompt "a red circle at the top left" [--n 4 --sampler dpm++ --steps 25 --seed 1]

The same as `ldm-jax sample`; all flags: python sample.py --help. The work is done by `ldm_jax.sampling`.
"""
import sys

from ldm_jax.sampling import main

if __name__ == "__main__":
    sys.exit(main())
