"""The same recipe gives the same weights, bit for bit, in two separate processes: nothing that
differs between processes (string hash seeds, addresses, the order of sets, the time) reaches
what a stage computes."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import RECIPES, REPO

# sft on the tiny base, then ppo from it: training on fixed batches, then sampling.
CHAIN = ["sft:data.num_examples=64", "sft:training.max_steps=3", "sft:training.per_device_train_batch_size=8",
         "ppo.total_episodes=24", "ppo.batch_size=8", "ppo.response_length=6", "ppo:data.num_examples=32",
         "ppo:training.learning_rate=1e-3", "*:report.models={}"]


def test_two_processes_train_the_same_weights(tmp_path, tiny_base, reward_dir):
    runs = []
    for seed in ("1", "2"):  # Python's string hashing differs between the two processes
        (tmp_path / seed).mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "alignment", "run", str(RECIPES / "ppo.yaml"), *CHAIN,
                   f"sft:model={tiny_base}", f"ppo:reward_model={reward_dir}"]
        runs.append(subprocess.Popen(command, cwd=tmp_path / seed, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True))
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    start = (tiny_base / "model.safetensors").read_bytes()
    for stage in ("sft", "ppo"):
        first, second = ((tmp_path / seed / "runs" / stage / "model.safetensors").read_bytes() for seed in ("1", "2"))
        assert first == second, stage
        assert first != start, stage  # it did train
