"""The stage contract: each registered stage (omni/registry.py) is what its spec says. Its script
trains its class, its default config exists, and every checkpoint it writes holds exactly its
declared weight keys (the optional ones only when its config trains them). The rest of the
contract is data too, and the code, the configs and the docs say the same: the folders of other
stages it reads are keys of its config, the splits it scores are, parallel=fsdp shards exactly
the `sharded` stages, and the tables of docs/design.md show the registry."""
import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, load_pt, run_script, write_config
from omni import checkpoint as ckpt
from omni.config import UserError
from omni.registry import STAGES, by_prefix, letter_of, prefixes, sharded
from omni.stages import stage_class
from omni.train.loop import check_weight_keys
from omni.train.parallel import parallelize
from omni.train.stage import Stage


@pytest.mark.parametrize("letter", sorted(STAGES))
def test_the_registry_names_the_stage_its_script_trains(letter):
    spec = STAGES[letter]
    cls = stage_class(letter)
    assert cls.__name__ == spec.cls and cls.spec is spec
    assert os.path.isfile(os.path.join(ROOT, spec.config)), spec.config
    tree = ast.parse(open(os.path.join(ROOT, spec.script), encoding="utf-8").read())
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    called = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert (spec.module, spec.cls) in imported and f"trainer_main({spec.cls})" in called
    assert spec.command == f"python {spec.script} --config {spec.config}"


def test_reading_the_registry_imports_no_torch():
    code = "import sys, omni.registry, omni.cli; print(sorted(m for m in sys.modules if m in ('torch', 'omni.stages')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_prefixes_and_keys_identify_one_stage_each():
    assert len(set(prefixes())) == len(STAGES)
    assert all(by_prefix(STAGES[letter].prefix).letter == letter == letter_of(STAGES[letter].prefix)
               for letter in STAGES)
    assert letter_of("nothing") == "?" and by_prefix("nothing") is None
    for spec in STAGES.values():
        assert not set(spec.weight_keys) & set(spec.optional_keys)
        assert not set(spec.weight_keys) & ckpt.NON_WEIGHT_KEYS
        assert {letter for _, letter in spec.components} <= STAGES.keys()


def test_a_stage_whose_modules_differ_from_its_spec_is_refused():
    class Wrong:
        spec, modules = STAGES["D"], {"model": None}      # Stage D saves talker and rvq
    with pytest.raises(RuntimeError, match=r"stage D \(talker\) built modules \['model'\]"):
        check_weight_keys(Wrong())


def config_keys(letter: str) -> dict:
    """The keys of the stage's config class, with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(stage_class(letter).config_class)}


def default_config(letter: str) -> dict:
    with open(os.path.join(ROOT, STAGES[letter].config), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("letter", sorted(STAGES))
def test_the_folders_a_stage_reads_are_keys_of_its_config(letter):
    spec, keys, config = STAGES[letter], config_keys(letter), default_config(letter)
    assert default_config(letter)["save_dir"] == spec.default_save_dir == keys["save_dir"]
    assert not {k for k, _ in spec.components} & {k for k, _ in spec.reads}
    for key, source in spec.inputs:
        assert source in STAGES and source != letter
        # by default it looks where the other stage's default config trains into
        assert keys[key] == STAGES[source].default_save_dir, key
        assert config.get(key, keys[key]) == STAGES[source].default_save_dir, key


def test_stage_d_reads_stage_b_and_stage_e_is_built_from_a_b_and_c():
    assert STAGES["D"].reads == (("asr_ckpt_dir", "B"),) and STAGES["D"].components == ()
    assert [letter for _, letter in STAGES["E"].components] == ["A", "B", "C"]
    assert [spec.letter for spec in STAGES.values() if spec.inputs] == ["D", "E"]


@pytest.mark.parametrize("letter", sorted(STAGES))
def test_the_splits_a_stage_scores_are_keys_of_its_config(letter):
    spec, keys, cls = STAGES[letter], config_keys(letter), stage_class(letter)
    assert spec.splits[0] == "val" and set(spec.splits) <= {"val", "test"}
    assert cls.val_key in keys
    assert ("test_manifest" in keys) == ("test" in spec.splits)
    # only a stage that scores a test split fills test_data; the loop reads Stage's None otherwise
    source = open(os.path.join(ROOT, *spec.module.split(".")) + ".py", encoding="utf-8").read()
    assert ("self.test_data =" in source) == ("test" in spec.splits)
    assert Stage.test_data is None


@pytest.mark.parametrize("letter", sorted(STAGES))
def test_fsdp_shards_exactly_the_sharded_stages(letter):
    stage = SimpleNamespace(spec=STAGES[letter], modules={"net": torch.nn.Linear(2, 2)})
    if STAGES[letter].sharded:
        parallel = parallelize(stage, "fsdp", world_size=1)    # one rank: DCP step folders, no engine
        assert parallel.folders and parallel.mode == "none"
    else:
        with pytest.raises(UserError, match=rf"fsdp shards stages {', '.join(sharded())}; stage {letter} "):
            parallelize(stage, "fsdp", world_size=1)
    assert parallelize(stage, "ddp", world_size=1).mode == "none"


def doc_table(path: str, header: str) -> dict[str, list[str]]:
    """Letter -> cells of the rows of the markdown table whose header line starts with `header`."""
    lines = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def folders_in(cell: str) -> tuple:
    return tuple((key, letter) for letter, key in re.findall(r"([A-Z]) \(`(\w+)`", cell))


def test_the_design_doc_tables_say_what_the_registry_says():
    identity = doc_table("docs/design.md", "| stage | script |")
    contract = doc_table("docs/design.md", "| stage | default config |")
    assert identity.keys() == contract.keys() == STAGES.keys()
    for letter, spec in STAGES.items():
        script, _, prefix, keys = identity[letter]
        assert (script, prefix) == (f"`{spec.script}`", f"`{spec.prefix}`")
        named = re.findall(r"`(\w+)`", keys)     # the weight keys, then the optional ones with their config keys
        assert named[:len(spec.weight_keys)] == list(spec.weight_keys) and set(spec.optional_keys) <= set(named)
        config, fsdp, splits, built_from, uses = contract[letter]
        assert config == f"`{spec.config}`"
        assert fsdp == ("shards it" if spec.sharded else "no (ddp)")
        assert splits == ", ".join(spec.splits)
        assert (folders_in(built_from), folders_in(uses)) == (spec.components, spec.reads)
    training = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
    assert f"the `sharded` stages of the registry: {' and '.join(sharded())};" in training


@pytest.mark.parametrize("output, letter", [("asr", "B"), ("tts", "D"), ("image_caption", "C"), ("text", "A")])
def test_prepare_names_the_trainer_and_the_splits_of_the_registry(output, letter):
    from omni.data.prepare import manifest_name, next_command
    manifests = {manifest_name(output, split): {} for split in ("train", "val", "test")}
    command = next_command(output, "out", manifests)
    spec = STAGES[letter]
    assert command.startswith(spec.command + " --set demo_dir= ")
    if output != "text":
        assert [k for k in re.findall(r"--set (\w+)_manifest=", command)] == ["train", *spec.splits]


def weight_keys_in(path: str) -> set[str]:
    return set(load_pt(path)) - ckpt.NON_WEIGHT_KEYS


@pytest.mark.parametrize("letter", "ABCD")
def test_a_trained_stage_saves_exactly_its_weight_keys(letter, trained_stages):
    config = trained_stages[letter]
    spec, save_dir = STAGES[letter], config["save_dir"]
    optional = {"caption_decoder"} if letter == "C" and config.get("decoder_layers", 0) > 0 else set()
    for path in [ckpt.final_path(save_dir, spec.prefix), ckpt.best_path(save_dir, spec.prefix)]:
        assert weight_keys_in(path) == set(spec.weight_keys) | optional, path


@pytest.mark.parametrize("freeze, train_vision, trained", [(True, False, ()), (False, False, ("audio_enc", "vision")),
                                                           (True, True, ("vision",))],
                         ids=["frozen_encoders", "trained_encoders", "trained_vision"])
def test_stage_e_saves_its_encoders_only_when_it_trains_them(freeze, train_vision, trained, trained_stages, tmp_path):
    spec = STAGES["E"]
    cfg = {**trained_stages["E"], "save_dir": str(tmp_path / "omni"), "max_steps": 1, "eval_interval": 1,
           "qa_eval_limit": 2, "freeze_encoders": freeze, "train_vision": train_vision,
           "vision_cache": "vision" not in trained}
    run_script(spec.script, "--config", write_config(tmp_path / "omni.json", cfg), check=True)
    expected = set(spec.weight_keys) | set(trained)
    assert weight_keys_in(ckpt.final_path(cfg["save_dir"], spec.prefix)) == expected


# ----------------------------------------------------------------------------- Stage E inherits
@pytest.fixture(scope="module")
def small_encoders(trained_stages, demo_tiny, tmp_path_factory):
    """Stage B with 40 mel bands and Stage C with 32-pixel images (defaults: 80, 64), two steps each."""
    from test_audio_enc import audio_enc_config
    from test_vision import vision_config
    root = tmp_path_factory.mktemp("small_encoders")
    for script, cfg in [("train_audio_enc.py", audio_enc_config(demo_tiny, root / "audio_enc", n_mels=40)),
                        ("train_vision.py", vision_config(demo_tiny, root / "vision", image_size=32))]:
        cfg.update(max_steps=2, eval_interval=2, checkpoint_freq=0)
        run_script(script, "--config", write_config(root / f"{script}.json", cfg), check=True)
    return {**trained_stages["E"], "audio_enc_dir": str(root / "audio_enc"), "vision_dir": str(root / "vision"),
            "max_steps": 1, "eval_interval": 1, "qa_eval_limit": 2}


def test_stage_e_takes_image_size_and_mels_from_the_encoders_it_loads(small_encoders, tmp_path):
    cfg = {**small_encoders, "save_dir": str(tmp_path / "omni")}
    run_script("sft_omni.py", "--config", write_config(tmp_path / "omni.json", cfg), check=True)
    saved = load_pt(ckpt.final_path(cfg["save_dir"], "omni"))["config"]
    assert (saved["image_size"], saved["n_mels"]) == (32, 40)


@pytest.mark.parametrize("key, value, folder", [("image_size", 64, "vision_dir"), ("n_mels", 80, "audio_enc_dir")])
def test_stage_e_refuses_a_size_its_encoder_was_not_trained_with(key, value, folder, small_encoders, tmp_path):
    cfg = {**small_encoders, "save_dir": str(tmp_path / "omni"), key: value}
    proc = run_script("sft_omni.py", "--config", write_config(tmp_path / "omni.json", cfg))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: config key '{key}': {value} differs from ") and \
        f"of the model in {small_encoders[folder]}" in lines[-1], proc.stderr
    assert len([line for line in lines if line.startswith("error:") or "Traceback" in line]) == 1
