import pytest

from medisee.config import ConfigError, flatten, load_config, preset_names


def test_presets_load():
    assert {"tiny", "medisee-7b"} <= set(preset_names())
    assert load_config("tiny").model.preset == "tiny"
    assert load_config("medisee-7b").data.sam_image_size == 1024
    full = load_config("medisee-7b-full").trainer
    assert (full.finetune, full.strategy) == ("full", "fsdp")
    assert load_config("medisee-7b").trainer.strategy == "ddp"


def test_a_yaml_file_loads_as_the_preset_it_copies(tmp_path):
    from importlib import resources

    copy = tmp_path / "mine.yaml"
    copy.write_text((resources.files("medisee.presets") / "medisee-7b.yaml").read_text())
    assert load_config(copy) == load_config("medisee-7b")


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ConfigError, match="strategy"):
        load_config("tiny", ["trainer.strategy=zero3"])


def test_dotted_overrides_are_typed():
    cfg = load_config(
        "tiny", ["trainer.num_workers=4", "data.mix={a: 1, b: 2}", "storage.endpoint=http://x:1"]
    )
    assert cfg.trainer.num_workers == 4
    assert cfg.data.mix == {"a": 1.0, "b": 2.0}
    assert cfg.storage.endpoint == "http://x:1"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="trainer.num_wrkers"):
        load_config("tiny", ["trainer.num_wrkers=4"])
    with pytest.raises(ConfigError, match="bogus"):
        load_config("tiny", ["bogus.key=1"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.num_workers"):
        load_config("tiny", ["trainer.num_workers=many"])


def test_unknown_key_in_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 0.1\n  nope: 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.nope"):
        load_config(path)


def test_missing_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")


def test_flatten_gives_dotted_params():
    flat = flatten(load_config("tiny"))
    assert flat["trainer.num_workers"] == 2
    assert "data.mix.sa-med2d" in flat


def test_image_sizes_follow_the_model_preset():
    cfg = load_config("medisee-7b", ["model.llava_path=x", "model.sam_checkpoint=y"])
    assert (cfg.data.sam_image_size, cfg.data.clip_image_size) == (1024, 336)
    assert load_config("tiny", ["data.sam_image_size=128"]).data.sam_image_size == 128
    with pytest.raises(ConfigError, match=r"data\.sam_image_size=1024.*model\.preset='tiny'"):
        load_config("tiny", ["data.sam_image_size=1024"])


def test_a_resume_may_change_run_length_but_not_the_model_or_data():
    from medisee.config import resume_differences

    saved = load_config("tiny")
    longer = load_config("tiny", ["trainer.max_steps=5000", "trainer.eval_every=7", "trainer.strategy=fsdp"])
    assert resume_differences(saved, longer) == []
    changed = load_config("tiny", ["trainer.lr=0.5", "model.num_candidate_tokens=3", "data.batch_size=9"])
    keys = [key for key, _, _ in resume_differences(saved, changed)]
    assert keys == ["data.batch_size", "model.num_candidate_tokens", "trainer.lr"]


def test_resuming_with_a_changed_model_is_an_error_naming_the_key():
    from medisee.config import config_to_yaml
    from medisee.train.checkpoints import check_resumable

    saved = config_to_yaml(load_config("tiny"))
    check_resumable(saved, load_config("tiny", ["trainer.max_steps=9"]), "step-00000003.pt")
    with pytest.raises(ValueError, match=r"step-00000003\.pt.*trainer\.finetune: 'full' -> 'lora'"):
        check_resumable(saved, load_config("tiny", ["trainer.finetune=lora"]), "step-00000003.pt")


def test_a_config_stored_by_an_earlier_version_still_loads():
    """Artifacts and checkpoints keep their config: the section `infer` (now `scoring`) and keys
    removed since (`tracking.registered_model`, an unset `model.medisee_checkpoint`) are read back."""
    import yaml

    from medisee.config import ConfigError, config_to_yaml, load_config, stored_config

    data = yaml.safe_load(config_to_yaml(load_config("tiny", ["scoring.mllm_actors=3"])))
    data["infer"] = data.pop("scoring")
    data["tracking"]["registered_model"] = "medisee"
    data["model"]["medisee_checkpoint"] = None
    cfg = stored_config(yaml.safe_dump(data))
    assert cfg.scoring.mllm_actors == 3 and cfg == load_config("tiny", ["scoring.mllm_actors=3"])
    data["model"]["medisee_checkpoint"] = "s3://stage-one/trainable.pt"  # that format is gone
    with pytest.raises(ConfigError, match="model.medisee_checkpoint: unknown config key"):
        stored_config(yaml.safe_dump(data))
