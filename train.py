"""`python train.py --config configs/X.py --workdir DIR [--config.a.b=value ...]`: the same as `ldm-jax train`
(`ldm_jax.training.main.main`, whose docstring lists the flags, the stages and what they write)."""
import sys

from ldm_jax.training.main import main

if __name__ == "__main__":
    sys.exit(main())
