"""kpfast.train under torchrun: two CPU processes (gloo), one tiny run."""

import json
import os
import socket
import subprocess
import sys

import torch

from kpfast.checkpoint import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KPFAST_NO_REEXEC": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "kpfast.train", "--preset", "tiny", "--out", str(out),
           "--cache-dir", str(cache), "--iterations", "3", "--set", "checkpoint_every=3"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["iterations"] == 3
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # each rank drew its own shard of unlabelled images and its own transforms
    assert not torch.equal(ckpt["rng"][0]["streams"]["transforms"], ckpt["rng"][1]["streams"]["transforms"])
    # only rank 0 wrote logs: one row per step
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 3
