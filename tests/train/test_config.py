"""Bad config input ends with one line naming the key or file, and exit status 2."""
import json

import pytest

from conftest import ROOT, run_script, thinker_config, write_config
from omni.cli import one_line
from omni.config import TrainConfig, UserError, load_config
from omni.stages.text import TextConfig, TextStage
from omni.train.main import trainer_main


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        trainer_main(TextStage, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


@pytest.mark.parametrize("argv, named", [
    (["--set", "bogus_key=1"], "bogus_key"),
    (["--set", "lr=fast"], "lr"),
    (["--set", "batch_size=2.5"], "batch_size"),
    (["--set", "batch_size=0"], "batch_size"),
    (["--set", "amp=fp8"], "amp"),
    (["--set", "train_files=notalist.txt"], "train_files"),
    (["--set", "dropout"], "dropout"),
    (["--config", "no/such/config.json"], "no/such/config.json"),
    (["--set", "train_files=[\"no/such/corpus.txt\"]", "--set", "demo_dir="], "no/such/corpus.txt"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, named):
    code, err = run_main(capsys, "--set", f"save_dir={tmp_path}", *argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def test_bad_json_and_unknown_key_in_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": 0.1,\n "seed": }')
    code, err = run_main(capsys, "--config", str(bad))
    assert code == 2 and str(bad) in err[0] and "line 2" in err[0]
    bad.write_text(json.dumps({"learning_rate": 0.1}))
    code, err = run_main(capsys, "--config", str(bad))
    assert code == 2 and "learning_rate" in err[0] and str(bad) in err[0]


def test_missing_data_file_names_the_key(capsys, tmp_path, corpus):
    cfg = thinker_config(corpus, tmp_path / "run", val_file=str(tmp_path / "missing_val.txt"))
    code, err = run_main(capsys, "--config", write_config(tmp_path / "c.json", cfg))
    assert code == 2 and "'val_file'" in err[0] and "missing_val.txt" in err[0]


def test_overrides_are_typed_and_comments_ignored(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "ignored", "lr": 1, "train_files": ["a.txt"]}))
    cfg = load_config(TextConfig, str(path), ["max_steps=7", "save_dir=out/x", "grad_clip=0", "strict_data=true"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.max_steps == 7
    assert cfg.save_dir == "out/x" and cfg.strict_data is True and cfg.train_files == ["a.txt"]
    with pytest.raises(UserError, match="strict_data"):
        load_config(TrainConfig, None, ["strict_data=1"])


def test_real_command_line_prints_no_traceback():
    proc = run_script("train_text.py", "--set", "lr=abc")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --set lr: cannot read 'abc' as float"


def test_one_line_unwraps_errors_from_dataloader_workers():
    wrapped = UserError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1\nomni.data.common.DataError: a.wav line 3: bad WAV")
    assert one_line(wrapped) == "a.wav line 3: bad WAV"


def test_shares_must_lie_between_zero_and_one():
    from omni.stages.omni_sft import OmniSFTConfig
    assert load_config(OmniSFTConfig, None, ["answer_smoothing=1"]).answer_smoothing == 1.0
    for cls, override, message in ((OmniSFTConfig, "answer_smoothing=1.5", "at most 1.0"),
                                   (OmniSFTConfig, "answer_smoothing=-0.1", "at least 0.0")):
        with pytest.raises(UserError, match=f"'{override.split('=')[0]}': must be {message}"):
            load_config(cls, None, [override])


def test_cpu_threads_sets_torchs_threads_on_the_cpu_only_when_given():
    import torch

    from omni.runtime import setup_runtime
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        setup_runtime(load_config(TrainConfig, None, ["device=cpu"]))
        assert torch.get_num_threads() == 2                    # 0: torch's own setting stays
        setup_runtime(load_config(TrainConfig, None, ["device=cpu", "cpu_threads=1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="'cpu_threads'"):
        load_config(TrainConfig, None, ["cpu_threads=-1"])


# ----------------------------------------------------------------------------- named sizes
TINY = f"{ROOT}/configs/thinker_tiny.json"


def test_a_named_size_fills_the_architecture_keys_a_config_leaves_out(tmp_path):
    from omni.thinker import ThinkerArch
    path = write_config(tmp_path / "c.json", {"size": "base", "n_layers": 3})
    cfg = load_config(TextConfig, path)
    assert (cfg.d_model, cfg.vocab_size, cfg.n_layers) == (ThinkerArch.SIZES["base"]["d_model"], 16384, 3)
    tiny = load_config(TextConfig, TINY)
    bigger = load_config(TextConfig, TINY, ["size=base"])
    assert (tiny.d_model, bigger.d_model) == (128, 640) and bigger.max_steps == tiny.max_steps
    assert load_config(TextConfig, path, ["d_model=320"]).d_model == 320     # --set wins over the size


def test_a_size_change_on_resume_is_refused_by_the_keys_it_changes():
    from omni.config import config_dict
    from omni.resume_policy import config_changes
    saved = config_dict(load_config(TextConfig, TINY))
    changes = config_changes(saved, load_config(TextConfig, TINY, ["size=base"]))
    assert "size" not in changes.refused and {"d_model", "n_layers"} <= changes.refused.keys()


@pytest.mark.parametrize("cls, size, says", [
    (TextConfig, "huge", "one of base, tiny"),
    (TrainConfig, "tiny", "TrainConfig has no named sizes"),
    (TextConfig, 3, "unknown size 3"),
])
def test_an_unknown_size_is_one_line_naming_the_key(tmp_path, cls, size, says):
    with pytest.raises(UserError, match="config key 'size'") as info:
        load_config(cls, write_config(tmp_path / "c.json", {"size": size}))
    assert says in str(info.value)


def test_each_config_names_its_size_and_repeats_none_of_its_keys():
    """A size is written once, beside its Arch: a config that picks it holds only what differs."""
    import glob
    import os

    from omni.config import size_values
    from omni.registry import STAGES
    from omni.stages import stage_class
    letters = {os.path.basename(s.config).rsplit("_", 1)[0]: s.letter for s in STAGES.values()}
    checked = 0
    for path in glob.glob(f"{ROOT}/configs/*_*.json"):
        name, size = os.path.basename(path)[:-len(".json")].rsplit("_", 1)
        if name not in letters or letters[name] == "E":     # E builds its model from A, B and C: no size
            continue
        with open(path) as f:
            keys = json.load(f)
        assert keys["size"] == size, path
        assert not keys.keys() & size_values(stage_class(letters[name]).config_class, size).keys(), path
        checked += 1
    assert checked == 9
