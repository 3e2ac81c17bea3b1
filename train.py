"""Thin Hydra entry point: ``python train.py +exp=NAME [key=value ...]`` -> :func:`cytologia.train.train`."""

import hydra
from omegaconf import DictConfig

import cytologia  # noqa: F401  (sets the offline environment before anything heavy is imported)
from cytologia.errors import CytologiaInputError
from cytologia.train import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except CytologiaInputError as err:  # a bad config or input: the message says where, no traceback needed
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
