"""Files survive torn writes (issue 38, items 4, 6, 11, 14c-e): a torn last line of metrics.jsonl is
dropped with a note; a failed append leaves none; exports of every format are renamed into place
whole; a full disk in a DCP save is one line on every rank; a second Ctrl-C inside a save exits 130;
atomic_write words its error by errno and gives files the mode a plain open() would."""
import errno
import json
import os
import shutil
import stat

import pytest

from conftest import load_pt, run_script, thinker_config, tree_bytes, write_config
from omni import checkpoint as ckpt
from omni import logs
from omni.config import UserError
from omni.export import export
from omni.pipeline import best_val_metrics
from omni.plot import read_metrics

TORN = '{"step": 7, "split": "tr'


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, corpus):
    """(config, config path) of a tiny Stage A run of 4 steps: step files 2 and 4, validation at 2 and 4."""
    root = tmp_path_factory.mktemp("torn")
    cfg = thinker_config(corpus, root / "run", max_steps=4, checkpoint_freq=2, eval_interval=2)
    path = write_config(root / "run.json", cfg)
    run_script("train_text.py", "--config", path, check=True)
    return cfg, path


def one_line_error(proc, *fragments) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- item 4: metrics.jsonl
def test_a_torn_last_line_is_dropped_with_a_note_by_every_reader(four_steps, tmp_path, capsys):
    cfg, _ = four_steps
    save_dir = tmp_path / "run"
    os.makedirs(save_dir)
    with open(os.path.join(cfg["save_dir"], "metrics.jsonl")) as f:
        whole = f.read()
    path = save_dir / "metrics.jsonl"
    path.write_text(whole + TORN)
    lines = whole.count("\n") + 1
    assert [r["step"] for r in logs.read_records(str(path))] == [r["step"] for r in map(json.loads, whole.splitlines())]
    assert best_val_metrics(str(save_dir))["step"] in (2, 4)
    train, val = read_metrics(str(save_dir))
    assert len(train) == 4 and len(val) == 2
    notes = capsys.readouterr().out.splitlines()
    assert notes == [f"{path}: dropped a torn last line (line {lines})"] * 3
    path.write_text('[1, 2]\n' + whole)      # not the last line: damaged, dropped too
    assert len(logs.read_records(str(path))) == lines - 1
    assert f"{path}: dropped a line that is not a metrics record (line 1)" in capsys.readouterr().out


def test_a_run_resumes_past_a_torn_last_line(four_steps, tmp_path):
    cfg, _ = four_steps
    run = tmp_path / "run"
    shutil.copytree(cfg["save_dir"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(TORN)
    more = write_config(tmp_path / "more.json", dict(cfg, save_dir=str(run), max_steps=5))
    proc = run_script("train_text.py", "--config", more)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{run}/metrics.jsonl: dropped a torn last line" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5]


def test_a_failed_append_cuts_the_file_back_and_says_so_in_one_line(tmp_path, monkeypatch):
    log = logs.MetricsLog(str(tmp_path), 0, True)
    log.write({"step": 1, "split": "train", "loss": 2.0})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real_write = os.write

    def full(fd, data):                   # the disk fills up 10 bytes into the record
        if len(data) > 10:
            return real_write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ckpt.CheckpointError) as err:
        log.write({"step": 2, "split": "train", "loss": 1.5})
    monkeypatch.undo()
    assert str(err.value) == (f"cannot write metrics.jsonl in {tmp_path}: No space left on device; the files "
                              "already there are untouched: free space and run the same command again")
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


# ----------------------------------------------------------------------------- item 14d, 14e: atomic_write
@pytest.mark.parametrize("code, advice", [
    (errno.EROFS, "the folder is not writable; check its permissions and run the same command again"),
    (errno.EACCES, "the folder is not writable; check its permissions and run the same command again"),
    (errno.EDQUOT, "free space and run the same command again"),
    (errno.EIO, None)])
def test_a_failed_write_says_what_to_do_by_its_errno(tmp_path, code, advice):
    def refused(f):
        raise OSError(code, os.strerror(code))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.atomic_write(str(tmp_path / "x.pt"), refused)
    head = f"cannot write x.pt in {tmp_path}: {os.strerror(code)}; the files already there are untouched"
    assert str(err.value) == (f"{head}: {advice}" if advice else head)
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        ckpt.save(str(tmp_path / "a.pt"), {"w": 1})
        ckpt.write_json(str(tmp_path / "a.json"), {})
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("a.pt", "a.json", "plain")}
    assert modes == {"a.pt": 0o640, "a.json": 0o640, "plain": 0o640}


# ----------------------------------------------------------------------------- item 14c: a second Ctrl-C
def test_a_second_ctrl_c_inside_a_save_stops_at_once_with_130(four_steps, tmp_path):
    cfg, _ = four_steps
    run = tmp_path / "run"
    path = write_config(tmp_path / "c.json", dict(cfg, save_dir=str(run)))
    proc = run_script("train_text.py", "--config", path, runner=True, env={"OMNI_TEST_SIGINT_IN_SAVE": "4"})
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "interrupted: a second Ctrl-C stops at once; the checkpoints already saved are whole (one being written "
        "is dropped): run the same command again to resume"]
    assert "thinker_step_4.pt" not in os.listdir(run) and load_pt(run / "thinker_step_2.pt")["step"] == 2
    proc = run_script("train_text.py", "--config", path)
    assert proc.returncode == 0 and "thinker_step_2.pt at step 2" in proc.stdout, proc.stderr[-2000:]
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


# ----------------------------------------------------------------------------- item 6: exports
def contents(folder) -> dict:
    """relative path -> contents of every file below folder; a safetensors file as its metadata and
    tensors (its header's key order varies from one write to the next)."""
    from safetensors import safe_open
    found = tree_bytes(folder)
    for rel in [r for r in found if r.endswith(".safetensors")]:
        with safe_open(os.path.join(folder, rel), "pt") as f:
            found[rel] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})
    return found


def crash_in(monkeypatch, module, name: str, calls: int = 1):
    """Make the `calls`-th call of module.name end the process at once (exit 9), as a kill would."""
    real, seen = getattr(module, name), []

    def crash(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            os._exit(9)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, crash)


def in_child(fn) -> int:
    """Run fn() in a forked child; its exit status (0: returned, 1: raised)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def crash_export(monkeypatch, point: str, source: str, out: str, fmt: str = "omni") -> None:
    """Export in a child that is killed at `point` of the export."""
    if point == "before the last file":          # the tokenizer is copied last
        crash_in(monkeypatch, shutil, "copyfile")
    elif point == "between the renames":         # the old export renamed aside, the new one not yet in
        crash_in(monkeypatch, os, "rename", 2)
    else:                                        # both renamed, the old one not yet deleted
        crash_in(monkeypatch, ckpt, "remove")
    assert in_child(lambda: export(source, out, fmt)) == 9
    monkeypatch.undo()


@pytest.mark.parametrize("fmt", ["omni", "pt", "hf"])
@pytest.mark.parametrize("point", ["before the last file", "between the renames", "before deleting the old"])
def test_an_interrupted_export_leaves_the_old_one_or_the_new_one_whole(four_steps, tmp_path, monkeypatch, fmt,
                                                                       point, capsys):
    if fmt == "hf":
        pytest.importorskip("tokenizers")
    cfg, _ = four_steps
    old_ckpt, new_ckpt = (os.path.join(cfg["save_dir"], f"thinker_step_{n}.pt") for n in (2, 4))
    out = str(tmp_path / "out")
    export(old_ckpt, out, fmt)
    export(new_ckpt, str(tmp_path / "new"), fmt)
    old, new = contents(out), contents(tmp_path / "new")
    assert old != new
    crash_export(monkeypatch, point, new_ckpt, out, fmt)
    assert any(n.startswith(".out.") for n in os.listdir(tmp_path))        # what the kill left
    if point == "between the renames":         # both whole, under hidden names
        assert not os.path.exists(out)
        assert contents(tmp_path / ".out.old.tmp") == old and contents(tmp_path / ".out.tmp") == new
    else:
        assert contents(out) == (old if point == "before the last file" else new)
    capsys.readouterr()

    export(new_ckpt, out, fmt)                  # the next export cleans up, with a note
    assert contents(out) == new and sorted(os.listdir(tmp_path)) == ["new", "out"]
    assert "left by an interrupted export" in capsys.readouterr().out


def test_a_kill_between_the_renames_puts_the_old_export_back_at_the_next_export(four_steps, tmp_path, monkeypatch):
    cfg, _ = four_steps
    old_ckpt, new_ckpt = (os.path.join(cfg["save_dir"], f"thinker_step_{n}.pt") for n in (2, 4))
    out = str(tmp_path / "out")
    export(old_ckpt, out)
    old = contents(out)
    crash_export(monkeypatch, "between the renames", new_ckpt, out)
    crash_export(monkeypatch, "before the last file", new_ckpt, out)      # the old one was put back first
    assert contents(out) == old


def test_an_interrupted_gguf_export_leaves_the_old_file_whole(four_steps, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from omni import export_llama
    cfg, _ = four_steps
    out = tmp_path / "out"
    first = export(os.path.join(cfg["save_dir"], "thinker_step_2.pt"), str(out), "gguf")[0]
    assert first == str(out / "thinker-f32.gguf")
    old = (out / "thinker-f32.gguf").read_bytes()
    real = export_llama.write_gguf

    def killed_halfway(sd, arch, sp_path, path, dtype):
        real(sd, arch, sp_path, path, dtype)
        with open(path, "r+b") as f:
            f.truncate(len(old) // 2)
        os._exit(9)
    monkeypatch.setattr(export_llama, "write_gguf", killed_halfway)
    assert in_child(lambda: export(os.path.join(cfg["save_dir"], "thinker_step_4.pt"), str(out), "gguf")) == 9
    assert (out / "thinker-f32.gguf").read_bytes() == old


def test_a_failed_export_write_is_one_line_and_leaves_no_temp(four_steps, tmp_path, monkeypatch):
    cfg, _ = four_steps
    out = tmp_path / "out"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(ckpt.CheckpointError, match=f"cannot write out in {tmp_path}: No space left on device"):
        export(cfg["save_dir"], str(out))
    assert os.listdir(tmp_path) == []


def test_an_export_refuses_a_folder_it_would_replace_with_other_files(four_steps, tmp_path):
    cfg, _ = four_steps
    before = tree_bytes(cfg["save_dir"])
    with pytest.raises(UserError, match=r"holds .*metrics.jsonl.*, which an export does not write"):
        export(os.path.join(cfg["save_dir"], "thinker_step_2.pt"), cfg["save_dir"], "hf")
    assert tree_bytes(cfg["save_dir"]) == before


# ----------------------------------------------------------------------------- item 11: DCP saves
@pytest.mark.parametrize("fault", ["OMNI_TEST_ENOSPC_IN_DCP", "OMNI_TEST_ENOSPC_IN_TRAINER_PT"])
def test_a_full_disk_in_a_dcp_save_is_one_line_and_leaves_the_previous_folders(four_steps, tmp_path, fault):
    cfg, _ = four_steps
    run = tmp_path / "run"
    path = write_config(tmp_path / "f.json", dict(cfg, save_dir=str(run), parallel="fsdp"))
    proc = run_script("train_text.py", "--config", path, runner=True, env={fault: "4"})
    one_line_error(proc, f"cannot write thinker_step_4.dcp in {run}: No space left on device",
                   "free space and run the same command again")
    names = os.listdir(run)
    assert "thinker_step_2.dcp" in names and "thinker_step_4.dcp" not in names, names
    assert not [n for n in names if n.endswith(".tmp")], names
    proc = run_script("train_text.py", "--config", path)
    assert proc.returncode == 0 and "thinker_step_2.dcp at step 2" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("fault, rank", [("OMNI_TEST_ENOSPC_IN_DCP", "1"), ("OMNI_TEST_ENOSPC_IN_TRAINER_PT", "0")])
def test_a_full_disk_on_one_rank_stops_every_rank_with_the_same_line(four_steps, tmp_path, fault, rank):
    """Under torchrun (Gloo, 2 ranks on the CPU) a rank whose write fails leaves no rank waiting."""
    import subprocess
    import sys

    from conftest import ROOT
    cfg, _ = four_steps
    run = tmp_path / "run"
    path = write_config(tmp_path / "f.json", dict(cfg, save_dir=str(run), parallel="fsdp"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "tests/stage_runner.py", "train_text.py", "--config", path]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", fault: "4", "OMNI_TEST_ONLY_RANK": rank}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = (f"error: cannot write thinker_step_4.dcp in {run}: No space left on device; the files already there "
            "are untouched: free space and run the same command again")
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]             # each rank, one line
    assert "exitcode  : 2" in proc.stderr and "CheckpointException" not in proc.stderr
    names = os.listdir(run)
    assert "thinker_step_2.dcp" in names and not [n for n in names if n.endswith(".tmp") or "step_4" in n], names


def test_a_real_full_filesystem_during_an_export_is_one_line(four_steps, small_tmpfs):
    """On a 64 KiB tmpfs, where the weights file meets ENOSPC itself."""
    cfg, _ = four_steps
    for fmt in ("omni", "hf"):
        with pytest.raises(ckpt.CheckpointError, match=f"cannot write out in {small_tmpfs}: No space left on device"):
            export(cfg["save_dir"], str(small_tmpfs / "out"), fmt)
        assert os.listdir(small_tmpfs) == []
