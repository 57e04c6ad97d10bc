"""`inspector train` under torchrun: two CPU ranks (gloo) that split each step's global batch train as one process.

What is compared, two ranks against one process with the same global batch of 4 (2 per rank):
- the per-step loss of the autoencoder and diffusion phases (rank 0's train_progress events, the global batch's
  mean): equal within float rounding. The ranks see exactly the single process's samples (the step's whole batch
  drawn by one rank and scattered), so only the order of float32 sums differs (two half-batch means averaged,
  gradients averaged by DistributedDataParallel), about 1e-7 relative per step; the events round the loss to 5
  decimals, hence abs=2e-5.
- the memory prior the segmenter trains with (the checkpoint's) and the SKU's stored memory and fine memory, their
  owners and scales: identical, bit for bit (each rank describes the same image batches as the single process,
  gathered in their order).
- the trained autoencoder and the EMA denoiser and fusion the SKU holds: equal within 1e-5 (5e-7 measured).
Not the segmenter's losses and weights: its decoder's BatchNorm layers normalise over each rank's half of the batch
on the CPU (torch's SyncBatchNorm, which the ranks use on CUDA, runs on GPUs only). So the EMA that rank 0 alone keeps
reaching rank 1 for the segmenter phase (DistributedDataParallel broadcasts rank 0's weights when it wraps a phase)
is checked on Ranks itself, with the other collectives train_sku uses.

Run as a script (by torchrun), this file is one rank: the CLI with a train_progress event per step, its events
written to <prefix>.<RANK>.json.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from structlog.testing import capture_logs

from foundation.errors import ConfigError
from inspector.cli import exit_process, main
from tdad.manifest import read_manifest
from tdad.training import train
from tdad.training.distributed import Ranks
from tdad.training.sample_data import write_good_folder
from tdad.training.train import STATE_DIR

TORCHRUN = Path(sys.executable).with_name("torchrun")
MEMORY = ("segmenter.memory", "segmenter.memory_owner", "segmenter.memory_scale", "segmenter.fine_memory",
          "segmenter.fine_memory_scale")


def train_argv(data: Path, out: Path) -> list[str]:
    """A tiny `inspector train`: 32 px, a global batch of 4, 3 + 3 + 2 steps, every memory the SKU can have."""
    return ["train", "--data", str(data), "--out", str(out), "--device", "cpu", "--threads", "1", "--image-size", "32",
            "--batch-size", "4", "--ae-steps", "3", "--diffusion-steps", "3", "--seg-steps", "2", "--memory", "32",
            "--inference-memory", "64", "--fine-memory", "32", "--no-select"]


def losses(events: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(phase, step) -> the loss of the step's global batch, from train_progress events."""
    return {(e["phase"], e["step"]): e["loss"] for e in events if e["event"] == "train_progress"}


def run_rank(prefix: str, argv: list[str]) -> int:
    """One rank: the CLI with a progress event per step; its events to <prefix>.<RANK>.json."""
    torch.set_num_threads(1)
    train.PROGRESS_EVERY_S = 0.0
    with capture_logs() as events:
        code = main(argv)
    Path(f"{prefix}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps(events, default=str))
    return code


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_train_as_one_process_with_the_same_global_batch(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_good_folder(tmp_path / "good", 6, 32, "brick", seed=0)  # memory batches of 4 and 2: uneven shares
    monkeypatch.setattr(train, "PROGRESS_EVERY_S", 0.0)
    with capture_logs() as events:
        assert main(train_argv(data, tmp_path / "one")) == 0
    one = losses(events)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", __file__,
                            str(tmp_path / "events"), *train_argv(data, tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300, check=False)
    assert ranks.returncode == 0, ranks.stderr[-4000:]
    assert ranks.stdout.count("SKU written to") == 1  # rank 0 alone reports (and would choose settings)
    assert json.loads((tmp_path / "events.1.json").read_text()) == []  # rank 1 logs nothing
    two = losses(json.loads((tmp_path / "events.0.json").read_text()))

    assert one.keys() == two.keys() and len(one) == 3 + 3 + 2
    for key in [k for k in one if k[0] != "segmenter"]:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=2e-5), key
    sku_one, sku_two = load_file(str(tmp_path / "one" / "model.safetensors")), \
        load_file(str(tmp_path / "two" / "model.safetensors"))
    assert [k for k in MEMORY if not torch.equal(sku_one[k], sku_two[k])] == []
    trained = [load_file(str(tmp_path / out / STATE_DIR / "weights.safetensors"))["model.segmenter.memory"]
               for out in ("one", "two")]
    assert torch.equal(*trained)
    for key in [k for k in sku_one if k.split(".")[0] in ("encoder", "decoder", "denoiser", "fusion")]:
        torch.testing.assert_close(sku_two[key], sku_one[key], rtol=0, atol=1e-5, msg=key)
    assert read_manifest(tmp_path / "two").train_hash == read_manifest(tmp_path / "one").train_hash


def collectives_of_rank(rank: int, port: int) -> None:
    """One of two gloo ranks (torch.multiprocessing.spawn): each Ranks collective gives what the docstring says."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks, cpu = Ranks.from_env(), torch.device("cpu")
    with ranks.joined(cpu, batch_size=4):
        torch.manual_seed(rank)  # each rank its own weights, as rank 1's denoiser without the EMA rank 0 keeps
        module = torch.nn.Linear(3, 2)
        wrapped = ranks.wrap(module, cpu)
        weights = ranks.gather({rank: module.weight.detach().clone()})
        assert torch.equal(weights[0], weights[1])  # rank 0's, on both
        steps = range(5, 8)  # steps 5 and 7 drawn by rank 0, 6 by rank 1; each batch [10 s, 10 s + 1, ...]
        drawn = iter([{"x": torch.arange(4.0) + 10 * s, "n": torch.full((4, 1), s)} for s in ranks.mine(steps)])
        shares = list(ranks.shares(drawn, steps, cpu))
        assert [b["x"].tolist() for b in shares] == [[10 * s + 2 * rank, 10 * s + 2 * rank + 1] for s in steps]
        assert [b["n"].flatten().tolist() for b in shares] == [[s, s] for s in steps]
        loss = wrapped(shares[0]["x"][:, None].expand(2, 3)).sum()
        loss.backward()  # the gradient of the two ranks' mean loss, on both
        grads = ranks.gather({rank: module.weight.grad.clone()})
        assert torch.equal(grads[0], grads[1])
        assert ranks.mean_and_any(torch.tensor(1.0 + rank), flag=rank == 1) == (1.5, True)
        assert sorted(ranks.gather({10 + rank: torch.zeros(rank + 1)})) == [10, 11]
    exit_process(0)  # as the console script ends a rank: DistributedDataParallel kept the gloo group alive


@pytest.mark.slow
def test_ranks_collectives_on_two_gloo_processes() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(collectives_of_rank, args=(port,), nprocs=2)


def test_a_global_batch_the_ranks_cannot_split_is_one_line_before_any_process_group() -> None:
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1, 2)
    assert Ranks.from_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) == Ranks() == Ranks.from_env({})
    with pytest.raises(ConfigError, match=r"^batch_size=6 does not divide by WORLD_SIZE=4 .* multiple of 4$"), \
            Ranks(0, 4, 0, 4).joined(torch.device("cpu"), 6):
        pass
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":
    exit_process(run_rank(sys.argv[1], sys.argv[2:]))
