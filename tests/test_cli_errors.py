"""Bad input through the real CLI: one line naming what and where, exit code 2, no traceback,
and nothing in output_dir that looks finished."""

import json

import pytest

from conftest import base_config, run_cli, write_config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def bad_inputs(tmp_path):
    return {
        "missing": tmp_path / "nope.jsonl",
        "malformed": write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n'),
        "fields": write(tmp_path / "fields.jsonl", "\n".join(json.dumps(r) for r in [
            {"instruction": "a", "output": "b"}, {"instruction": "a"}, {"instruction": "x"}])),
        "long": write(tmp_path / "long.jsonl", "\n".join(
            json.dumps({"instruction": "word " * 200, "output": "ok"}) for _ in range(20))),
        "latin1": write_bytes(tmp_path / "latin1.jsonl", b'{"instruction": "a", "output": "b"}\n'
                                                          b'{"instruction": "caf\xe9", "output": "b"}\n'),
        "a_file": write(tmp_path / "taken", "not a directory"),
        "no_model_type": write(tmp_path / "nomodel" / "config.json", '{"hidden_size": 64}').parent,
    }


def write_bytes(path, data):
    path.write_bytes(data)
    return path


CASES = {
    "missing data file": ({"data": {"train": "@missing"}}, "data.train: file not found: "),
    "malformed json": ({"data": {"train": "@malformed"}}, "bad.jsonl:2: malformed JSON"),
    "missing fields": ({"data": {"train": "@fields"}}, "2 records lack the alpaca fields (instruction, output (strings)); first at index 1"),
    "empty after truncation": ({"data": {"train": "@long", "cutoff_len": 32}}, "no training sample keeps an assistant token after truncation at data.cutoff_len=32"),
    "unknown method": ({"method": {"type": "oft"}}, "method.type='oft': unknown method 'oft'"),
    "absent target modules": ({"method": {"lora": {"target_modules": ["c_attn"]}}}, "method.lora.target_modules: ['c_attn'] not in the model; linear modules are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
    "rank zero": ({"method": {"lora": {"r": 0}}}, "method.lora.r=0: Input should be greater than 0"),
    "val_size": ({"data": {"val_size": 1.0}}, "data.val_size=1.0: must be inside (0, 1)"),
    "unreachable mlflow": ({"tracking": {"mlflow_uri": "http://127.0.0.1:9"}}, "tracking.mlflow_uri=http://127.0.0.1:9 is unreachable"),
    "fp16 on cpu": ({"train": {"precision": "fp16"}}, "train.precision=fp16 needs GPUs"),
    "too many workers": ({"distributed": {"num_workers": 8}}, "distributed.num_workers=8 x cpus_per_worker=1 needs 8 CPUs; the Ray cluster has 4"),
    "not utf-8": ({"data": {"train": "@latin1"}}, "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at offset 56); save the file as UTF-8"),
    "no target modules": ({"method": {"lora": {"target_modules": []}}}, "method.lora.target_modules=[]: names no module; list at least one, or use all-linear"),
    "output_dir is a file": ({"top": {"output_dir": "@a_file"}}, "taken is an existing file, not a directory"),
    "no model_type": ({"model": {"name_or_path": "@no_model_type"}}, "config.json has no model_type, so the architecture is unknown"),
    "cutoff beyond context": ({"data": {"cutoff_len": 4096}}, "data.cutoff_len=4096 exceeds the model's context of 1024 tokens"),
    "soft prompt beyond context": ({"method": {"type": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 1000}}},
                                   "data.cutoff_len=128 plus method's 1000 virtual tokens exceeds the model's context of 1024"),
    "block of another method": ({"method": {"type": "ia3", "lora": {"r": 4}}}, "method.lora: a block for method 'lora', but method.type is 'ia3'"),
    "bitfit without biases": ({"method": {"type": "bitfit"}}, "method.type=bitfit: model type 'llama' has no bias terms"),
}


def config_of(tmp_path, tiny_model, alpaca_file, case: str) -> dict:
    sections, _ = CASES[case]
    inputs = bad_inputs(tmp_path)
    config = base_config(tmp_path, tiny_model, alpaca_file)
    for section, values in sections.items():
        values = {k: (str(inputs[v[1:]]) if isinstance(v, str) and v.startswith("@") else v) for k, v in values.items()}
        if section == "top":
            config.update(values)
        elif section == "method" and "type" in values:
            config["method"] = values
        elif section == "method" and "lora" in values:
            config["method"]["lora"].update(values["lora"])
        else:
            config[section].update(values)
    return config


@pytest.fixture(scope="module")
def refused_runs(ray_address, tmp_path_factory, tiny_model, alpaca_file):
    """Every case's `rayft train` command line, run by rayft's entry point in a child forked from
    one warm process (tests/warm_cli.py), two at a time: a fresh process per case would spend ~5 s
    importing before it refuses anything."""
    import subprocess
    import sys
    from pathlib import Path

    jobs, dirs = [], []
    for case in CASES:
        case_dir = tmp_path_factory.mktemp("case")
        config = write_config(case_dir, config_of(case_dir, tiny_model, alpaca_file, case))
        jobs.append({"args": ["train", str(config)], "cwd": str(case_dir), "stdout": str(case_dir / "stdout"),
                     "stderr": str(case_dir / "stderr")})
        dirs.append(case_dir)
    jobs_file = tmp_path_factory.mktemp("jobs") / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    warm = subprocess.run([sys.executable, str(Path(__file__).parent / "warm_cli.py"), str(jobs_file)],
                          capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    codes = json.loads(warm.stdout.strip().splitlines()[-1])
    return {case: (case_dir, subprocess.CompletedProcess(job["args"], code, (case_dir / "stdout").read_text(),
                                                         (case_dir / "stderr").read_text()))
            for case, case_dir, job, code in zip(CASES, dirs, jobs, codes)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_exit_code_2(refused_runs, case):
    _, expected = CASES[case]
    case_dir, done = refused_runs[case]
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (case_dir / "out" / "metrics.json").exists()


def test_unknown_config_key_via_set(tmp_path, tiny_model, alpaca_file):
    config = write_config(tmp_path, base_config(tmp_path, tiny_model, alpaca_file))
    done = run_cli("train", str(config), "--set", "train.learning_rate=1")
    assert done.returncode == 2 and done.stderr.strip() == f"error: {config}: unknown key train.learning_rate"


def test_hub_ids_fail_at_once(tmp_path, alpaca_file):
    config = base_config(tmp_path, tmp_path / "x", alpaca_file)
    config["model"]["name_or_path"] = "meta-llama/Llama-3-8B"
    done = run_cli("train", str(write_config(tmp_path, config)))
    assert done.returncode == 2
    assert "model.name_or_path='meta-llama/Llama-3-8B' is neither a local model directory nor a known alias" in done.stderr
