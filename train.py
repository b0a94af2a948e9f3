"""Training entry point: `python train.py --config configs/X.py --workdir DIR [--config.a.b=value ...]`.

The config file's `get_config()` gives a locked ConfigDict; `--config.a.b=value` overrides a field (an
unknown field or a value of the wrong type is an error). `config.stage` picks the stage ("autoencoder" or
"ldm"); the work happens in `ldm_jax.training.main.train_and_evaluate(config, workdir)`, which logs where its
outputs go (checkpoints, TensorBoard, metrics.jsonl, image grids, the exported model). Rerunning with the
same --workdir resumes from its last checkpoint. Several hosts: pass --coordinator/--num_processes/--process_id
(or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID) on every host.
"""
import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Overrides: --config.a.b=value")
    parser.add_argument("--config", required=True, help="training config file (configs/*.py)")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs, image grids and the export go here")
    parser.add_argument("--coordinator", default=None, help="jax.distributed coordinator address host:port")
    parser.add_argument("--num_processes", type=int, default=None, help="number of processes (hosts)")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ldm_jax").setLevel(logging.INFO)  # our progress lines; libraries stay at warnings
    from ldm_jax import parallel  # noqa: PLC0415 (JAX starts after the arguments are checked)
    from ldm_jax.training.main import load_config, train_and_evaluate  # noqa: PLC0415

    try:
        config = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"train.py: error: {err}\n")
    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    train_and_evaluate(config, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
