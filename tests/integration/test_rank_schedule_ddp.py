"""The rank schedule under DDP: two CPU processes (gloo) make the same resize decisions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import CONFIGS, ROOT
from tests.test_rank_schedule import gsm8k_dir, only_run  # noqa: F401  (fixture)
from tests.test_training import _env

#: Runs the CLI and, as each process closes its trainer, dumps its ranks and adapter.
DUMP = """
import sys
from pathlib import Path

import torch

from strato_peft.cli import main
from strato_peft.methods.resize import module_ranks
from strato_peft.training import loop

OUT = Path(sys.argv[1])
close = loop.Trainer.close


def dump_then_close(self, failed=False):
    model = self.accelerator.unwrap_model(self.model)
    tensors = {n: p.detach().cpu() for n, p in model.named_parameters() if "lora_" in n}
    torch.save({"ranks": module_ranks(model), "params": tensors, "wrapper": type(self.model).__name__},
               OUT / f"process{self.accelerator.process_index}.pt")
    close(self, failed)


loop.Trainer.close = dump_then_close
sys.exit(main(sys.argv[2:]))
"""


def test_two_processes_make_identical_resizes(gsm8k_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    script = tmp_path / "dump_run.py"
    script.write_text(DUMP)
    out = tmp_path / "ddp"
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    done = subprocess.run(
        [
            launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path),
            "--config", str(CONFIGS / "experiments" / "tiny_lora_schedule.yaml"),
            "--override", f"task.data_path={gsm8k_dir}", "--override", f"output.dir={out}",
            "--override", f"logging.log_dir={out}/logs", "--override", "training.batch_size=1",
            "--override", "task.final_eval=false", "--no-wandb", "--fast-dev-run",
        ],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    folder = only_run(out)
    assert json.loads((folder / "env.json").read_text())["num_processes"] == 2
    history = json.loads((folder / "rank_history.json").read_text())
    assert list(history) == ["0", "2", "3"] and history["3"] != history["0"]
    first, second = (torch.load(tmp_path / f"process{i}.pt") for i in (0, 1))
    assert first["wrapper"] == second["wrapper"] == "DistributedDataParallel"
    assert first["ranks"] == second["ranks"] == history["3"]
    assert first["params"].keys() == second["params"].keys()
    for name, tensor in first["params"].items():
        assert torch.equal(tensor, second["params"][name]), name
    b_moved = [t for n, t in first["params"].items() if "lora_B" in n and t.numel()]
    assert any(t.abs().sum() > 0 for t in b_moved)
