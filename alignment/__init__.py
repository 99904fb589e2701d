"""Alignment pipeline toolkit: one YAML recipe takes a checkpoint through pretraining,
SFT, reward modelling and DPO, on Accelerate."""

__version__ = "0.1.0"


def launch(recipe_file: str) -> None:
    """Entry point of the first line of every recipe: run the file as a recipe and exit.

    `accelerate launch recipes/sft.yaml` runs the recipe with Python; its first line calls
    this, with the command-line overrides in sys.argv.
    """
    import sys

    from .cli import main

    sys.exit(main(["run", recipe_file, *sys.argv[1:]]))
