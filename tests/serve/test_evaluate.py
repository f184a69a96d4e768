"""`python -m omni.evaluate`: the figures training logged, for any checkpoint form and manifest."""
import json
import os
import shutil

import pytest
import torch

from conftest import load_pt, run_script, write_config
from omni import checkpoint as ckpt
from omni.cli import run_cli
from omni.evaluate import evaluate, main
from omni.export import export
from omni.registry import STAGES
from omni.stages import stage_class

ID_KEYS = {"stage", "checkpoint", "format", "step", "manifest"}
TRAINING_ONLY = {"unigram_entropy"}       # figures of the training text, which evaluation does not read
# Every stage's training data pointed at files that do not exist: evaluation must not need them.
NO_TRAINING_DATA = {
    "A": ['train_files=["/nonexistent/train.txt"]'],
    "B": ["train_manifest=/nonexistent/train.jsonl"],
    "C": ["train_manifest=/nonexistent/train.jsonl"],
    "D": ["train_manifest=/nonexistent/train.jsonl"],
    "E": ["train_manifest=/nonexistent/train.jsonl", "asr_manifest=/nonexistent/asr.jsonl"],
}


@pytest.fixture(scope="module")
def stages(trained_stages, tmp_path_factory):
    """Letter -> config of the five tiny stages, all trained (E here, for a few steps)."""
    folder = tmp_path_factory.mktemp("omni_eval")
    configs = dict(trained_stages, E={**trained_stages["E"], "save_dir": str(folder / "omni")})
    run_script("sft_omni.py", "--config", write_config(folder / "omni.json", configs["E"]), check=True)
    return configs


def val_records(save_dir: str) -> list[dict]:
    with open(os.path.join(save_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("split") == "val"]


def metrics_of(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ID_KEYS}


def assert_same_figures(got: dict, logged: dict):
    """Every figure of the logged validation record, and no other, within float noise."""
    expected = {k: v for k, v in logged.items() if k not in ("step", "split") and k not in TRAINING_ONLY}
    assert metrics_of(got).keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def snapshot(folder: str) -> dict:
    return {name: (os.path.getsize(os.path.join(folder, name)), os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in os.listdir(folder)}


def final_pt(cfg: dict, letter: str) -> str:
    return ckpt.final_path(cfg["save_dir"], STAGES[letter].prefix)


@pytest.mark.parametrize("letter", "ABCDE")
def test_stage_folder_gives_the_logged_figures_of_its_best_checkpoint(stages, letter):
    save_dir = stages[letter]["save_dir"]
    before = snapshot(save_dir)
    got = evaluate(save_dir, overrides=NO_TRAINING_DATA[letter])
    records = val_records(save_dir)
    best = min(records, key=lambda r: r["val_loss"])       # min() keeps the first: the one saved as best
    assert got["stage"] == letter and got["format"] == "full" and got["step"] == best["step"]
    assert got["checkpoint"] == ckpt.best_path(save_dir, STAGES[letter].prefix)
    assert got["manifest"] == stages[letter][stage_class(letter).val_key]
    assert_same_figures(got, best)
    assert snapshot(save_dir) == before          # nothing written into the checkpoint folder


@pytest.mark.parametrize("letter, manifest_key, logged_as", [
    ("B", "test_manifest", {"cer": "test_cer", "wer": "test_wer"}),
    ("C", "test_manifest", {"val_loss": "test_loss", "i2t_top1": "test_i2t_top1", "t2i_top1": "test_t2i_top1"}),
])
def test_manifest_replaces_the_validation_split(stages, letter, manifest_key, logged_as):
    cfg = stages[letter]
    last = val_records(cfg["save_dir"])[-1]         # the final checkpoint's validation
    got = evaluate(final_pt(cfg, letter), manifest=cfg[manifest_key])
    assert got["manifest"] == cfg[manifest_key] and got["step"] == last["step"]
    # Training scored this manifest as its test split: the same figures, now under the validation names.
    for key, logged in logged_as.items():
        assert got[key] == pytest.approx(last[logged], rel=1e-5), key
    assert got["val_loss"] != pytest.approx(last["val_loss"], rel=1e-5)    # beyond float noise: another split
    assert not any(k.startswith("test_") for k in got)      # only the given manifest is scored


def test_text_manifest_changes_the_figures(stages):
    cfg = stages["A"]
    on_val = evaluate(final_pt(cfg, "A"))
    on_train = evaluate(final_pt(cfg, "A"), manifest=cfg["train_files"][0])
    assert on_val["val_loss"] == pytest.approx(val_records(cfg["save_dir"])[-1]["val_loss"], rel=1e-5)
    assert on_train["manifest"] == cfg["train_files"][0]
    assert abs(on_train["val_loss"] - on_val["val_loss"]) > 1e-3


def legacy_copy(cfg: dict, out) -> str:
    """Stage A's final weights as a bare state_dict, with config.json and tokenizer.model beside it."""
    out.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(os.path.join(cfg["save_dir"], name), out / name)
    torch.save(load_pt(final_pt(cfg, "A"))["model"], out / "thinker.pt")
    return str(out / "thinker.pt")


def weights_only_copy(cfg: dict, out) -> str:
    out.mkdir()
    torch.save(ckpt.slim(load_pt(final_pt(cfg, "B"))), out / "audio_enc_slim.pt")
    return str(out / "audio_enc_slim.pt")


def export_copy(letter: str):
    def make(cfg: dict, out) -> str:
        export(final_pt(cfg, letter), str(out))
        return str(out)
    return make


@pytest.mark.parametrize("letter, form, make", [
    ("A", "legacy", legacy_copy), ("B", "weights-only", weights_only_copy),
    ("B", "export", export_copy("B")), ("E", "export", export_copy("E")),
])
def test_other_checkpoint_forms_give_the_same_figures(stages, tmp_path, letter, form, make):
    cfg = stages[letter]
    full = evaluate(final_pt(cfg, letter))
    assert_same_figures(full, val_records(cfg["save_dir"])[-1])
    got = evaluate(make(cfg, tmp_path / "copy"))
    assert full["format"] == "full" and got["format"] == form and got["stage"] == letter
    assert metrics_of(got) == metrics_of(full)


def test_talker_intelligibility_through_the_stage_b_recognizer(stages):
    overrides = [f"asr_ckpt_dir={stages['B']['save_dir']}", "eval_sentences=2"]
    got = evaluate(final_pt(stages["D"], "D"), overrides=overrides)
    for key in ("cer", "codec_cer", "vocoder_cer"):
        assert 0.0 <= got[key] <= 5.0, key
    assert got["seconds_spoken"] > 0
    assert "cer" not in evaluate(final_pt(stages["D"], "D"))     # the run's own config has no recognizer


def test_command_prints_one_json_line_then_a_table(stages):
    save_dir = stages["C"]["save_dir"]
    proc = run_script("-m", "omni.evaluate", "--ckpt", save_dir, check=True)
    first, *rows = proc.stdout.strip().splitlines()
    record = json.loads(first)
    assert record["stage"] == "C" and record["checkpoint"].endswith("vision_best.pt")
    assert [row.split()[0] for row in rows] == list(record)
    assert float(dict(row.split(None, 1) for row in rows)["val_loss"]) == pytest.approx(record["val_loss"], rel=1e-5)
    assert "vision:" in proc.stderr          # the stage's notes stay off stdout


def cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(list(argv)))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_json_flag_prints_the_line_only(stages, capsys):
    code, out, _ = cli(capsys, "--ckpt", final_pt(stages["A"], "A"), "--json")
    assert code == 0 and len(out.strip().splitlines()) == 1 and json.loads(out)["stage"] == "A"


BAD_INPUT = {
    "missing path": (lambda s: ["--ckpt", "/nonexistent/ckpt"], "checkpoint not found: /nonexistent/ckpt"),
    "not a checkpoint": (lambda s: ["--ckpt", s["B"]["val_manifest"]], "cannot tell which stage"),
    "folder without one": (lambda s: ["--ckpt", os.path.dirname(s["B"]["val_manifest"])],
                           "no checkpoint of any stage"),
    "manifest of another kind": (lambda s: ["--ckpt", s["B"]["save_dir"], "--manifest", s["C"]["val_manifest"]],
                                 "missing field 'audio'"),
    "missing manifest": (lambda s: ["--ckpt", s["B"]["save_dir"], "--manifest", "/nonexistent/val.jsonl"],
                         "--manifest: file not found: /nonexistent/val.jsonl"),
    "unknown key": (lambda s: ["--ckpt", s["B"]["save_dir"], "--set", "no_such_key=1"],
                    "unknown config key 'no_such_key'"),
    "wrong type": (lambda s: ["--ckpt", s["B"]["save_dir"], "--set", "batch_size=many"], "batch_size"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_status_2(stages, capsys, case):
    args, message = BAD_INPUT[case]
    code, out, err = cli(capsys, *args(stages))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err
