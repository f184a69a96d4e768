"""End to end on the tiny demo world: the staged pipeline (train, skip, fail, resume), export ->
inspect -> infer, and infer's spoken questions and answers."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import soundfile as sf
from test_rundir import alive, holder, wait_for

from conftest import ROOT, run_script, thinker_config, write_config
from conftest import tiny_stage_configs as stage_configs

LETTERS = "ABCDE"


def write_pipeline(root, configs: dict, letters: str, background: str = "") -> str:
    stages = [{"stage": s, "config": write_config(root / f"stage_{s}.json", configs[s]), "background": s in background}
              for s in letters]
    return write_config(root / f"pipeline_{letters}.json", {"stages": stages})


def run_pipeline(path: str, env=None):
    return run_script("-m", "omni.pipeline", path, env=env)


@pytest.fixture(scope="module")
def trained(demo_tiny, tmp_path_factory):
    """The whole pipeline run once on the tiny world: (root, configs, pipeline path, process)."""
    root = tmp_path_factory.mktemp("pipeline")
    configs = stage_configs(demo_tiny, root)
    path = write_pipeline(root, configs, LETTERS, background="D")    # as the demo pipeline runs D beside E
    proc = run_pipeline(path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, configs, path, proc


def table_rows(stdout: str) -> dict:
    """Stage letter -> its row in the closing table, and "E test" etc. -> a stage's figures."""
    lines = stdout[stdout.rindex("stage  status"):].splitlines()[1:]
    rows = {}
    for line in lines:
        head = line.split(":")[0] if line[1:2] == " " and ":" in line.split()[1] else line[:1]
        if head[:1] in "ABCDEF":
            rows[head] = line
    return rows


@pytest.mark.parametrize("entry, named", [({"stage": "Z"}, "stages[0].stage"),
                                          ({"set": "max_steps=2"}, "stages[0].set"),
                                          ({"background": "yes"}, "stages[0].background")])
def test_a_malformed_pipeline_entry_is_a_one_line_error_naming_it(entry, named, tmp_path):
    from omni.config import UserError
    from omni.pipeline import read_pipeline
    config = os.path.join(ROOT, "configs", "thinker_tiny.json")
    path = write_config(tmp_path / "pipeline.json", {"stages": [{"stage": "A", "config": config, **entry}]})
    with pytest.raises(UserError, match=named.replace("[", r"\[").replace("]", r"\]")):
        read_pipeline(path)
    ok = write_config(tmp_path / "ok.json", {"stages": [{"stage": "A", "config": config, "background": True}]})
    assert read_pipeline(ok)[1][0].background is True


def test_table_shows_every_figure_with_held_out_ones_apart():
    from omni.pipeline import StageRun, table
    run = StageRun("E", "e.json", status="trained", steps=30, save_dir="ckpt/omni")
    names = ["loss", "image_acc", "image_colour", "image_shape", "image_size", "speech_acc", "text_acc"]
    run.metrics = {**{f"val_{k}": i / 10 for i, k in enumerate(names)},
                   **{f"test_{k}": i / 100 for i, k in enumerate(names)}, "note": "words"}
    text = table([run])
    val, test = text.split("E val:")[1].split("E test:")
    for i, k in enumerate(names):        # every figure, not the first four
        assert f"{k} {i / 10:.3g}" in val and f"{k} {i / 100:.3g}" in test
    assert "note" not in text and all(len(line) <= 110 for line in text.splitlines())


def test_table_shows_the_validation_whose_weights_infer_loads(tmp_path):
    """omni_best.pt holds the first lowest val_loss: the table gives that validation, with its step."""
    from omni.pipeline import StageRun, best_val_metrics, table
    records = [{"step": 10, "split": "val", "val_loss": 0.5, "test_image_acc": 0.7},
               {"step": 20, "split": "train", "loss": 0.1},
               {"step": 20, "split": "val", "val_loss": 0.3, "test_image_acc": 0.8},
               {"step": 30, "split": "val", "val_loss": 0.3, "test_image_acc": 0.9},
               {"step": 40, "split": "val", "val_loss": 0.4, "test_image_acc": 0.95}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = best_val_metrics(str(tmp_path))
    assert best == {"step": 20, "val_loss": 0.3, "test_image_acc": 0.8}
    run = StageRun("E", "e.json", status="trained", steps=40, save_dir=str(tmp_path), metrics=best)
    text = table([run])
    assert "E val:  best step 20, loss 0.3" in text and "E test: image_acc 0.8" in text
    assert best_val_metrics(str(tmp_path / "missing")) == {}


def final_checkpoint(save_dir, prefix) -> str:
    return os.path.join(save_dir, f"{prefix}.pt")


@pytest.mark.slow
def test_pipeline_trains_every_stage_then_skips_them(trained):
    root, configs, path, proc = trained
    rows = table_rows(proc.stdout)
    prefixes = dict(zip(LETTERS, ["thinker", "audio_enc", "vision", "talker", "omni"]))
    for s in LETTERS:
        assert "trained" in rows[s] and configs[s]["save_dir"] in rows[s], rows[s]
        assert os.path.isfile(final_checkpoint(configs[s]["save_dir"], prefixes[s]))
        assert os.path.isfile(os.path.join(configs[s]["save_dir"], "curves.png"))
    assert "image_acc" in rows["E test"] and "loss" in rows["E val"] and "9" in rows["A"].split()[2]
    # the background stage's output went to its log, not between the other stages' lines
    with open(os.path.join(configs["D"]["save_dir"], "pipeline.log")) as f:
        assert "talker: finished" in f.read()
    assert "talker: finished" not in proc.stdout + proc.stderr and "in the background" in proc.stdout
    assert rows["D"].split()[3] != "-" and float(rows["D"].split()[3]) > 0     # its own wall time

    metrics = os.path.join(configs["E"]["save_dir"], "metrics.jsonl")
    before = open(metrics).read()
    again = run_pipeline(path)
    assert again.returncode == 0, again.stderr
    rows = table_rows(again.stdout)
    assert all("skipped (finished)" in rows[s] for s in LETTERS), again.stdout
    assert "=== stage" not in again.stdout                          # no trainer was started
    assert open(metrics).read() == before


@pytest.mark.slow
def test_a_failed_stage_stops_the_run_and_a_rerun_resumes_it(demo_tiny, tmp_path):
    configs = stage_configs(demo_tiny, tmp_path)
    good_b = dict(configs["B"])
    configs["B"]["train_manifest"] = str(tmp_path / "missing.jsonl")
    proc = run_pipeline(write_pipeline(tmp_path, configs, "ABC"))
    assert proc.returncode == 2
    assert "missing.jsonl" in proc.stderr and "stage B failed" in proc.stderr
    rows = table_rows(proc.stdout)
    assert "trained" in rows["A"] and "failed" in rows["B"] and "pending" in rows["C"]
    thinker_final = final_checkpoint(configs["A"]["save_dir"], "thinker")
    stamp = os.path.getmtime(thinker_final)

    # Stage B now crashes (SIGKILL) at step 5 of a run started by hand; the pipeline resumes it.
    configs["B"] = good_b
    killed = run_script("train_audio_enc.py", "--config", write_config(tmp_path / "b.json", good_b),
                        env={"OMNI_TEST_KILL_AT_STEP": "5"}, runner=True)
    assert killed.returncode == -9
    proc = run_pipeline(write_pipeline(tmp_path, configs, "AB"))
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert "skipped (finished)" in rows["A"] and "trained" in rows["B"]
    assert f"resumed from {good_b['save_dir']}/audio_enc_step_3.pt" in proc.stdout
    assert os.path.getmtime(thinker_final) == stamp


def test_a_failed_background_stage_lets_the_others_finish_then_fails_the_run(demo_tiny, tmp_path):
    configs = stage_configs(demo_tiny, tmp_path)
    configs["D"]["train_manifest"] = str(tmp_path / "missing.jsonl")
    proc = run_pipeline(write_pipeline(tmp_path, configs, "DA", background="D"))
    assert proc.returncode == 2 and "stage D failed" in proc.stderr
    rows = table_rows(proc.stdout)
    assert "failed (exit 2)" in rows["D"] and "trained" in rows["A"]
    with open(os.path.join(configs["D"]["save_dir"], "pipeline.log")) as f:
        assert "missing.jsonl" in f.read()


def test_background_stages_run_one_after_another_and_a_failure_stops_their_lane(demo_tiny, tmp_path):
    """A, B and D in the background lane: B starts after A has ended; D fails, so a second lane
    stage after it never starts, while the foreground stage beside them trains."""
    configs = stage_configs(demo_tiny, tmp_path)
    configs["D"]["train_manifest"] = str(tmp_path / "missing.jsonl")
    configs["late"] = {**configs["A"], "save_dir": str(tmp_path / "late")}
    stages = [{"stage": s, "config": write_config(tmp_path / f"stage_{s}.json", configs[s]), "background": True}
              for s in "ABD"]
    stages.insert(2, {"stage": "C", "config": write_config(tmp_path / "stage_C.json", configs["C"])})
    stages.append({"stage": "A", "config": write_config(tmp_path / "late.json", configs["late"]), "background": True})
    proc = run_pipeline(write_config(tmp_path / "lane.json", {"stages": stages}))
    assert proc.returncode == 2 and "stage D failed" in proc.stderr
    lines = proc.stdout[proc.stdout.rindex("stage  status"):].splitlines()[1:6]
    statuses = [line.split()[1] for line in lines]
    assert statuses == ["trained", "trained", "trained", "failed", "pending"], lines
    a_done = os.path.getmtime(os.path.join(configs["A"]["save_dir"], "thinker.pt"))
    b_started = os.path.getmtime(os.path.join(configs["B"]["save_dir"], "config.json"))
    assert b_started >= a_done
    assert not os.path.exists(configs["late"]["save_dir"])


def infer(*args):
    return run_script("infer.py", *args)


@pytest.mark.slow
def test_export_inspect_infer_round_trip(trained, demo_tiny, tmp_path):
    _, configs, _, _ = trained
    omni_dir, out = configs["E"]["save_dir"], str(tmp_path / "export")
    run_script("-m", "omni.export", "--ckpt", omni_dir, "--out", out, check=True)
    for part in ("thinker", "audio_enc", "vision"):          # components come along
        assert os.path.isfile(os.path.join(out, part, "model.safetensors"))
    assert os.path.getsize(os.path.join(out, "model.safetensors")) < os.path.getsize(
        os.path.join(omni_dir, "omni.pt")) / 2

    shown = run_script("-m", "omni.inspect", out, check=True).stdout
    assert "export" in shown and "proj_a" in shown and "proj_v" in shown
    shown = run_script("-m", "omni.inspect", os.path.join(omni_dir, "omni.pt"), check=True).stdout
    assert "full" in shown and "optimizer" in shown

    sample = json.loads(open(f"{demo_tiny}/sft_test.jsonl").readline())
    question = ["--image", os.path.join(demo_tiny, sample["image"]), "--text", sample["conversation"][0]["content"]]
    from_ckpt = infer("--ckpt_dir", omni_dir, *question)
    from_export = infer("--ckpt_dir", out, *question)
    assert from_ckpt.returncode == 0 and from_export.returncode == 0, from_ckpt.stderr + from_export.stderr
    assert from_export.stdout == from_ckpt.stdout
    from omni.loading import load_omni
    for folder in (omni_dir, out):        # the options travel with the checkpoint and the export
        model = load_omni(folder, "cpu")[0]
        assert model.transcribe is True and model.patch_merge == 2


@pytest.mark.slow
def test_the_repaint_bench_scores_the_same_questions_on_both_versions_of_the_pictures(trained, demo_tiny):
    _, configs, _, _ = trained
    proc = run_script("bench/bench_repaint.py", "--ckpt", configs["E"]["save_dir"],
                      "--manifest", f"{demo_tiny}/sft_test.jsonl", "--limit", "6", check=True)
    rows = {line.split()[0]: re.findall(r"([0-9.]+)%", line) for line in proc.stdout.splitlines()[2:]}
    assert "image_acc" in rows and all(len(values) == 2 for values in rows.values()), proc.stdout
    assert proc.stdout.startswith("6 image questions of ")


@pytest.mark.slow
def test_infer_answers_a_spoken_question_aloud(trained, demo_tiny, tmp_path):
    _, configs, _, _ = trained
    record = next(json.loads(line) for line in open(f"{demo_tiny}/sft_val.jsonl") if '"audio"' in line)
    wav = str(tmp_path / "answer.wav")
    proc = infer("--ckpt_dir", configs["E"]["save_dir"], "--audio", os.path.join(demo_tiny, record["audio"]),
                 "--audio_out", wav, "--talker_dir", configs["D"]["save_dir"], "--max_new_tokens", "4")
    assert proc.returncode == 0, proc.stderr
    data, rate = sf.read(wav)
    assert rate == 16000 and len(data) > 1600 and abs(data).max() > 0.01


@pytest.mark.slow
def test_chat_reads_questions_until_quit(trained, demo_tiny):
    _, configs, _, _ = trained
    record = next(json.loads(line) for line in open(f"{demo_tiny}/sft_val.jsonl") if '"image"' in line)
    image = os.path.join(demo_tiny, record["image"])
    lines = f"what is one plus one?\n/image {image} what colour is the circle?\n/image nowhere.png hi\n/quit\n"
    proc = run_script("infer.py", "--ckpt_dir", configs["E"]["save_dir"], "--max_new_tokens", "3", input=lines)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("omni> ") == 3 and "error: nowhere.png: file not found" in proc.stdout


def test_infer_names_the_command_for_a_missing_model(tmp_path):
    proc = infer("--ckpt_dir", str(tmp_path / "none"), "--text", "hi")
    assert proc.returncode == 2 and "train_text.py" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = infer("--say", "hi", "--audio_out", str(tmp_path / "a.wav"), "--talker_dir", str(tmp_path))
    assert proc.returncode == 2 and "train_talker.py" in proc.stderr
    assert not os.path.exists(tmp_path / "a.wav")


def test_sft_names_the_missing_stage_and_its_command(tmp_path, corpus):
    cfg = {"save_dir": str(tmp_path / "omni"), "thinker_dir": str(tmp_path / "no_thinker"), "demo_dir": "",
           "train_manifest": str(tmp_path / "sft.jsonl"), "val_manifest": str(tmp_path / "sft.jsonl"),
           "test_manifest": ""}
    (tmp_path / "sft.jsonl").write_text('{"conversation": [{"role": "user", "content": "hi"}, '
                                        '{"role": "assistant", "content": "hello"}]}\n')
    proc = run_script("sft_omni.py", "--config", write_config(tmp_path / "e.json", cfg))
    assert proc.returncode == 2 and "no_thinker" in proc.stderr and "train_text.py" in proc.stderr


# ----------------------------------------------------------------------------- ending the pipeline
def long_stage_a(corpus, tmp_path) -> tuple[str, str]:
    """A pipeline of one Stage A run that trains until it is stopped: (pipeline path, save_dir)."""
    save_dir = str(tmp_path / "thinker")
    cfg = thinker_config(corpus, save_dir, max_steps=100000, checkpoint_freq=1000, eval_interval=1000)
    stages = [{"stage": "A", "config": write_config(tmp_path / "a.json", cfg)}]
    return write_config(tmp_path / "pipeline.json", {"stages": stages}), save_dir


def start_pipeline(path: str, log) -> subprocess.Popen:
    """The pipeline in a session of its own (so a test can end all it started), output to `log`."""
    return subprocess.Popen([sys.executable, "-m", "omni.pipeline", path], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)


def training_child(pipeline: subprocess.Popen, save_dir: str) -> int:
    """The pid of the pipeline's trainer once it holds save_dir and has taken a step."""
    wait_for(lambda: holder(save_dir).get("pid") not in (None, pipeline.pid)
             and os.path.isfile(os.path.join(save_dir, "metrics.jsonl")), "the stage's trainer to train")
    return holder(save_dir)["pid"]


def end_all(pipeline: subprocess.Popen, *pids: int) -> None:
    for pid in pids:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)
    try:
        os.killpg(pipeline.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pipeline.wait()
    wait_for(lambda: not any(pid and alive(pid) for pid in pids), "the trainers to end", timeout=30)


def test_sigterm_to_the_pipeline_stops_its_trainer_which_saves_then_the_pipeline(corpus, tmp_path):
    path, save_dir = long_stage_a(corpus, tmp_path)
    child = 0
    with open(tmp_path / "pipeline.out", "w+") as log:
        pipeline = start_pipeline(path, log)
        try:
            child = training_child(pipeline, save_dir)
            os.kill(pipeline.pid, signal.SIGTERM)         # the pipeline alone, as `kill PID` would
            assert pipeline.wait(timeout=120) == 143
            assert not alive(child)                       # waited for, not left behind
            log.seek(0)
            out = log.read()
        finally:
            end_all(pipeline, child)
    stopped = [int(n) for n in re.findall(r"thinker: stopped by SIGTERM at step (\d+)", out)]
    assert len(stopped) == 1, out[-3000:]
    assert os.path.isfile(os.path.join(save_dir, f"thinker_step_{stopped[0]}.pt"))
    assert "pipeline stopped by SIGTERM" in out and holder(save_dir) == {}


def test_a_killed_pipelines_orphan_keeps_a_restarted_pipeline_off_its_folder(corpus, tmp_path):
    path, save_dir = long_stage_a(corpus, tmp_path)
    orphan = 0
    with open(tmp_path / "first.out", "w") as first_log, open(tmp_path / "second.out", "w+") as second_log:
        pipeline = start_pipeline(path, first_log)
        again = None
        try:
            orphan = training_child(pipeline, save_dir)
            os.kill(pipeline.pid, signal.SIGKILL)
            pipeline.wait()
            assert alive(orphan)                          # SIGKILL passes nothing on: an orphan trains on
            again = start_pipeline(path, second_log)
            assert again.wait(timeout=120) == 2
            second_log.seek(0)
            out = second_log.read()
            assert f"error: {save_dir} is in use by another run (pid {orphan} on " in out, out[-3000:]
            assert "stage A failed (exit 2)" in out and holder(save_dir)["pid"] == orphan
        finally:
            end_all(pipeline, orphan)
            if again is not None:
                end_all(again)
