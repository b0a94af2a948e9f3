"""`python -m ldm_jax COMMAND ...`: the `ldm-jax` command line (ldm_jax.cli)."""
import sys

from ldm_jax.cli import main

sys.exit(main())
