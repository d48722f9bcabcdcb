"""`blip2 train CONFIG.yaml [--resume]`: one training stage as the YAML config says (see blip2.train.config).

The config is read and checked before anything loads: a wrong field is one line naming it, exit 2. Training
itself (torch, the model) is imported when the command runs, so that `blip2 --help` stays fast.
"""

from __future__ import annotations

import click


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in the config's run_dir.")
def train_command(config: str, resume: bool) -> None:
    """Train BLIP-2 (stage 1: Q-Former ITC + ITM + ITG; stage 2: the language-model loss) as CONFIG.yaml says,
    and export the result to run_dir/output in the Hugging Face layout."""
    from ..train.config import load_config

    parsed = load_config(config)  # TrainConfigError (an InputError, exit 2) naming the field
    from ..train.loop import run_training

    output = run_training(parsed, resume=resume)
    click.echo(f"trained checkpoint: {output}")
