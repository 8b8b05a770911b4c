from pathlib import Path

import pytest

from rayft.config import apply_overrides, dump_config, flatten, load_config, parse_config
from rayft.errors import ConfigError

MINIMAL = {"name": "x", "output_dir": "out", "data": {"train": "d.jsonl"}}


def with_keys(**sections):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in MINIMAL.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_defaults_match_the_documented_contract():
    cfg = parse_config(MINIMAL)
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert (cfg.method.type, cfg.method.lora.r, cfg.method.lora.alpha) == ("lora", 16, 32)
    assert cfg.method.lora.target_modules == "all-linear"
    assert (cfg.data.format, cfg.data.val_size, cfg.data.cutoff_len, cfg.data.packing) == ("auto", 0.1, 512, True)
    assert (cfg.train.micro_batch_size, cfg.train.lr, cfg.train.scheduler) == (4, 2e-4, "cosine")
    assert (cfg.distributed.num_workers, cfg.distributed.zero_stage, cfg.distributed.max_failures) == (2, 2, 2)
    assert cfg.tracking.experiment == "rayft"


@pytest.mark.parametrize("sections, fragment", [
    ({"method": {"type": "prefix"}}, "method.type='prefix': unknown method 'prefix'; allowed: adalora, adapter_fusion, "),
    ({"method": {"lora": {"r": 0}}}, "method.lora.r=0"),
    ({"data": {"val_size": 1.5}}, "data.val_size=1.5: must be inside (0, 1)"),
    ({"data": {"val_size": 0}}, "data.val_size=0"),
    ({"train": {"lerning_rate": 1}}, "unknown key train.lerning_rate"),
    ({"train": {"precision": "fp8"}}, "train.precision='fp8'"),
    ({"distributed": {"zero_stage": 4}}, "distributed.zero_stage=4"),
    ({"method": {"type": "qlora"}, "distributed": {"zero_stage": 3}}, "qlora cannot run with distributed.zero_stage=3"),
    ({"method": {"type": "qlora", "lora": {"r": 4}}}, "method.lora: a block for method 'lora', but method.type is 'qlora'"),
    ({"method": {"lora": {"rank": 4}}}, "unknown key method.lora.rank"),
    ({"method": {"lora": {"target_modules": []}}}, "method.lora.target_modules=[]: names no module; list at least one, or use all-linear"),
    ({"method": {"loraa": {}}}, "unknown key method.loraa"),
    ({"train": {"compile": True}, "distributed": {"zero_stage": 3}}, "train.compile: not with distributed.zero_stage=3"),
    ({"train": {"compile": True}, "method": {"type": "qlora"}},
     "train.compile: method.type=qlora cannot run with it (bitsandbytes' 4-bit layers do not compile)"),
])
def test_bad_values_name_the_key_and_value(sections, fragment):
    with pytest.raises(ConfigError) as error:
        parse_config(with_keys(**sections), source="c.yaml")
    message = str(error.value)
    assert fragment in message and message.startswith("c.yaml: ") and "\n" not in message
    assert "(top level)" not in message and "{" not in message.partition(": ")[2][:1]


def test_a_whole_config_check_prints_only_its_message():
    with pytest.raises(ConfigError) as error:
        parse_config(with_keys(distributed={"offload_params": True, "zero_stage": 2}), source="c.yaml")
    assert str(error.value) == "c.yaml: distributed.offload_params needs distributed.zero_stage=3"


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key data"):
        parse_config({"name": "x", "output_dir": "o"})


def test_overrides_are_typed_and_reach_any_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\noutput_dir: o\ndata: {train: d.jsonl}\n")
    cfg = load_config(path, ["train.lr=1e-3", "method.lora.target_modules=[q_proj, v_proj]", "data.packing=false"])
    assert cfg.train.lr == 1e-3 and cfg.method.lora.target_modules == ["q_proj", "v_proj"] and cfg.data.packing is False
    with pytest.raises(ConfigError, match="unknown key train.nope"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["train.lr"])


def test_exponent_numbers_are_floats_as_users_write_them(tmp_path):
    """PyYAML alone reads 1e-5 as a string (YAML 1.1); a sweep's results would then hold '1e-05'."""
    path = tmp_path / "c.yaml"
    path.write_text("name: x\noutput_dir: o\ndata: {train: d.jsonl}\ntrain: {lr: 1e-5, weight_decay: 1E-2}\n")
    assert apply_overrides({}, ["search.space={train.lr: {choice: [1e-05, 3e-3]}}"]) == \
        {"search": {"space": {"train.lr": {"choice": [1e-5, 3e-3]}}}}
    cfg = load_config(path)
    assert cfg.train.lr == 1e-5 and cfg.train.weight_decay == 0.01
    assert load_config(path, ['name="1e5"']).name == "1e5"  # quoted stays a string


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ndata: {train: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = parse_config(with_keys(train={"lr": 3e-4}))
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert flatten(cfg.to_dict())["method.lora.r"] == 16


def test_every_shipped_training_pipeline_parses():
    """Each pipelines/*.yaml training config is valid as shipped (sweep and serve configs have
    their own tests)."""
    from rayft.config import load_config, read_yaml

    repo = Path(__file__).resolve().parent.parent
    shipped = [p for p in sorted((repo / "pipelines").glob("*.yaml"))
               if "search" not in read_yaml(p) and "base_model" not in read_yaml(p)]
    assert {p.name for p in shipped} >= {"demo_lora.yaml", "dpo_lora.yaml", "qlora_sft.yaml"}
    for path in shipped:
        cfg = load_config(path)
        assert read_yaml(path).get("stage", "sft") == cfg.stage
