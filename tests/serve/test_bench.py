"""The bench harness runs and prints every figure it claims (not how fast: that is docs/bench.md),
and the `compile` option changes neither the checkpoint keys nor the results."""
import re
import types

import torch

from conftest import run_script
from omni.thinker import Thinker, ThinkerArch
from omni.train.speed import compile_modules

FIGURES = ["decode tokens/s, static KV cache", "train tokens/s, fused AdamW", "train tokens/s, bf16 autocast",
           "train tokens/s, compile (",
           "train tokens/s, compile + bf16 autocast", "fraction of fp32 matmul peak", "checkpoint save ms",
           "checkpoint MB"]
NUMBER = r"\s*([-+0-9.e]+|inf|nan)\s*"


def test_bench_quick_prints_every_figure_with_numbers():
    proc = run_script("bench/run.py", "--quick", check=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) == len(FIGURES), proc.stdout
    for figure, row in zip(FIGURES, rows):
        cells = row.strip("|").split("|")
        assert cells[0].strip().startswith(figure), row
        values = [float(re.fullmatch(NUMBER, cell).group(1)) for cell in cells[1:]]
        assert len(values) == 3 and all(v == v and v > 0 for v in values), row


def test_compiled_modules_keep_their_keys_and_outputs():
    torch.manual_seed(0)
    model = Thinker(ThinkerArch(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))
    stage = types.SimpleNamespace(modules={"model": model})
    ids = torch.randint(0, 50, (2, 12))
    keys, eager = list(model.state_dict()), model(ids)
    compile_modules(stage, types.SimpleNamespace(compile=False))
    assert model._compiled_call_impl is None          # where nn.Module.compile keeps the compiled call
    compile_modules(stage, types.SimpleNamespace(compile=True), backend="eager")
    assert model._compiled_call_impl is not None
    assert list(model.state_dict()) == keys
    assert torch.equal(model(ids), eager)
