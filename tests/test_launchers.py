"""Which accelerate launchers the RL stages accept: one process, DDP and FSDP (sharded by the toolkit
with FSDP2, on CPUs too: tests/test_fsdp.py trains that way); DeepSpeed is refused before anything
trains, in one line naming what works."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.cli import main
from alignment.errors import RecipeError
from alignment.pipeline import distributed, plan
from alignment.stages import common

from .conftest import RECIPES


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_rl_stages_refuse_deepspeed_in_one_line(in_tmp, tiny_base, reward_dir, monkeypatch, capsys, stage):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code = main(["run", str(RECIPES / f"{stage}.yaml"), f"model={tiny_base}", f"reward_model={reward_dir}",
                 "report.models={}", "output_dir=out/rl"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"stage '{stage}' does not run under DeepSpeed" in err[0] and "multi_gpu.yaml" in err[0]
    assert "use FSDP2" in err[0] and "recipes/accelerate/fsdp.yaml" in err[0]
    assert not (in_tmp / "out").exists()


def test_rl_stage_under_deepspeed_is_refused_before_the_chain_trains(in_tmp, tiny_base, reward_dir, monkeypatch):
    """The refusal comes at plan time: an sft -> ppo chain stops before sft runs."""

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError, match="stage 'ppo' does not run under DeepSpeed"):
        plan(RECIPES / "ppo.yaml", [f"reward_model={reward_dir}"])
    plan(RECIPES / "sft.yaml", [f"sft:model={tiny_base}"])  # trainer stages are left to accelerate's DeepSpeed


def test_rl_stages_under_fsdp_are_sharded_by_the_toolkit_on_cpus_and_gpus(tiny_base, reward_dir, monkeypatch):
    """Under an FSDP launch the RL stages are planned as FSDP2 (part of their hash: an output trained as
    DDP is not reused), on a CPU machine as on a GPU one; the trainer stages stay accelerate's (DDP on
    a CPU); with one process nothing is sharded."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    args = [f"model={tiny_base}", f"reward_model={reward_dir}"]
    for on_gpu in (False, True):
        monkeypatch.setattr(common, "use_cpu", lambda: not on_gpu)
        monkeypatch.setattr(common, "device_kind", lambda: "cuda/any" if on_gpu else "cpu/any")
        assert common.distributed_type(2) == ("fsdp" if on_gpu else "ddp")  # accelerate's FSDP: GPUs only
        [fsdp2] = plan(RECIPES / "ppo.yaml", args, num_processes=2)
        assert distributed(fsdp2.recipe, 2) == "fsdp2" and distributed(fsdp2.recipe, 1) == "single"
        sft = plan(RECIPES / "sft.yaml", [f"sft:model={tiny_base}"], num_processes=2)[-1]
        assert distributed(sft.recipe, 2) == ("fsdp" if on_gpu else "ddp")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    [ddp] = plan(RECIPES / "ppo.yaml", args, num_processes=2)
    assert ddp.hash != fsdp2.hash


class _ShardedTrainer:
    """What fit_and_save sees of a Trainer under accelerate's FSDP (GPUs only, so a stand-in here): the
    weights are shards, so only Trainer.save_model (which gathers them on every process) may save."""

    is_fsdp_enabled = True

    def __init__(self, rank: int):
        self.rank, self.saved, self.model = rank, [], object()
        self.state = type("State", (), {"log_history": [{"loss": 1.0}]})()

    def is_world_process_zero(self):
        return self.rank == 0

    def train(self, resume_from_checkpoint=None):
        return type("Result", (), {"training_loss": 1.0, "global_step": 1, "metrics": {}})()

    def save_model(self, directory):
        self.saved.append(directory)


@pytest.mark.parametrize("rank", [0, 1])
def test_trainer_stages_under_fsdp_save_through_the_trainer_on_every_process(tmp_path, monkeypatch, rank):
    from alignment import models
    from alignment.config import LoraOptions, SFTRecipe
    from alignment.stages import common

    monkeypatch.setattr(models, "save_model", lambda *a, **k: pytest.fail("a shard saved as if it were the model"))
    tok = type("Tok", (), {"save_pretrained": lambda self, d: (Path(d) / "tokenizer.json").write_text("{}")})()
    trainer = _ShardedTrainer(rank)
    summary = common.fit_and_save(trainer, tok, SFTRecipe(stage="sft", model="m"), tmp_path)
    assert trainer.saved == [str(tmp_path)] and summary["steps"] == 1  # every process takes part in the gather
    assert (tmp_path / "tokenizer.json").exists() == (rank == 0)
    with pytest.raises(RecipeError, match="lora.merge_on_save: under FSDP the trainer stages save the adapter only"):
        common.fit_and_save(_ShardedTrainer(rank), tok, SFTRecipe(stage="sft", model="m", lora=LoraOptions()), tmp_path)
