"""A damaged checkpoint folder ends in one line naming the file and the key, in every tool that reads it
(issue 38, items 12 and 7b): a config.json that is bad JSON, not an object, holds a string where a number
belongs or asks for a model larger than the machine; a checkpoint whose weights or config are not
dictionaries; a tokenizer.model that is not one. infer.py, inspect, export and evaluate share the
loaders (omni/loading.py, omni/checkpoint.py), so each case is tried on each tool that reads that file."""
import json
import os
import shutil

import pytest
import torch

import infer
from conftest import load_pt, run_script, thinker_config
from omni.config import UserError, build_config
from omni.evaluate import evaluate
from omni.export import export
from omni.inspect import describe
from omni.stages.text import TextConfig, TextStage
from omni.train.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """A finished 6-step Stage A run: thinker.pt (full), config.json, tokenizer.model."""
    save_dir = tmp_path_factory.mktemp("sidecars") / "run"
    assert train(TextStage, build_config(TextConfig, thinker_config(corpus, save_dir, max_steps=6))) == 0
    return str(save_dir)


def folder_with(run, tmp_path, payload: dict | None = None, config=None, tokenizer: bytes | None = None) -> str:
    """A copy of the run's model as thinker.pt (payload: the checkpoint dictionary, default a bare state_dict
    that takes its config from config.json), config.json (text or an object) and tokenizer.model beside it."""
    folder = tmp_path / "model"
    folder.mkdir()
    full = load_pt(os.path.join(run, "thinker.pt"))
    torch.save(full["model"] if payload is None else {**full, **payload}, folder / "thinker.pt")
    text = config if isinstance(config, str) else json.dumps(full["config"] if config is None else config)
    (folder / "config.json").write_text(text)
    if tokenizer is None:
        shutil.copyfile(os.path.join(run, "tokenizer.model"), folder / "tokenizer.model")
    else:
        (folder / "tokenizer.model").write_bytes(tokenizer)
    return str(folder)


def tools(folder: str, out: str) -> dict:
    """Each tool run on the folder, as a function raising what its command line prints."""
    return {"infer": lambda: infer.main(["--ckpt_dir", folder, "--text", "a red", "--max_new_tokens", "2"]),
            "inspect": lambda: describe(folder),
            "export": lambda: export(folder, out, "pt"),
            "export hf": lambda: export(folder, out, "hf"),
            "evaluate": lambda: evaluate(folder)}


def assert_one_line(tool, *fragments):
    with pytest.raises(UserError) as info:
        tool()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


CONFIGS = {
    "bad JSON": ('{"d_model": 32,\n "n_heads": }', "invalid JSON at line 2"),
    "not an object": ("[1, 2, 3]", "expected a JSON object of config keys"),
    "a string for a number": ({"d_model": "32"}, "config key 'd_model': expected int, got '32'"),
    "heads that do not divide": ({"d_model": 32, "n_heads": 3}, "config key 'n_heads': must divide d_model (32)"),
    "a model too large": ({"vocab_size": 2**30, "d_model": 1024}, "model too large: ThinkerArch"),
}


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize("tool", ["infer", "export", "evaluate"])
def test_a_bad_config_json_beside_the_weights(run, tmp_path, case, tool):
    config, message = CONFIGS[case]
    folder = folder_with(run, tmp_path, config=config)
    assert_one_line(tools(folder, str(tmp_path / "out"))[tool], os.path.join(folder, "config.json"), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["bad JSON", "not an object"])
def test_inspect_of_an_export_with_a_bad_config_json(run, tmp_path, case):
    exported = str(tmp_path / "exported")
    export(run, exported)
    with open(os.path.join(exported, "config.json"), "w") as f:
        f.write(CONFIGS[case][0])
    assert_one_line(lambda: describe(exported), os.path.join(exported, "config.json"), CONFIGS[case][1])


WEIGHTS = {
    "weights a string": ({"model": "not weights"},
                         "weight key 'model' is not a dictionary of tensors (it holds a str)"),
    "a name holding a list": ({"model": {"embed.weight": [1, 2]}},
                              "weight key 'model' is not a dictionary of tensors ('embed.weight' holds a list)"),
    "config a list": ({"config": [1, 2]}, "its 'config' entry is not a dictionary of config keys (it holds a list)"),
}


@pytest.mark.parametrize("case", WEIGHTS)
@pytest.mark.parametrize("tool", ["infer", "inspect", "export", "evaluate"])
def test_a_checkpoint_whose_entries_are_not_dictionaries(run, tmp_path, case, tool):
    payload, message = WEIGHTS[case]
    folder = folder_with(run, tmp_path, payload=payload)
    assert_one_line(tools(folder, str(tmp_path / "out"))[tool], os.path.join(folder, "thinker.pt"), message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["infer", "export hf", "evaluate"])
def test_a_garbage_tokenizer(run, tmp_path, tool):
    folder = folder_with(run, tmp_path, payload={}, tokenizer=b"\x00garbage, not a SentencePiece model")
    assert_one_line(tools(folder, str(tmp_path / "out"))[tool], os.path.join(folder, "tokenizer.model"),
                    "not a SentencePiece tokenizer model")
    assert not (tmp_path / "out").exists()


def test_unknown_keys_in_a_checkpoint_config_are_ignored_by_every_tool(run, tmp_path, capsys):
    """A checkpoint from a newer version may hold keys this one does not know: infer and evaluate alike
    use it (the weights still have to fit)."""
    config = {**load_pt(os.path.join(run, "thinker.pt"))["config"], "key_from_a_newer_version": 1}
    folder = folder_with(run, tmp_path, payload={"config": config})
    record = evaluate(folder)
    assert record["stage"] == "A" and record["val_loss"] > 0
    capsys.readouterr()
    assert infer.main(["--ckpt_dir", folder, "--text", "a red", "--max_new_tokens", "2"]) == 0
    assert describe(folder)["config"]["key_from_a_newer_version"] == 1


def test_the_command_lines_print_one_line_and_exit_2(run, tmp_path):
    folder = folder_with(run, tmp_path, payload={"model": "not weights"})
    for args in (["infer.py", "--ckpt_dir", folder, "--text", "hi"], ["-m", "omni.inspect", folder]):
        proc = run_script(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip() == (f"error: {folder}/thinker.pt: weight key 'model' is not a dictionary of "
                                       f"tensors (it holds a str)")
