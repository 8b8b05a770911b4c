"""rayft estimate: predicted peaks against measured ones (tiny model, one process), every method on the
meta device, the DPO stage, the advice, the pre-flight's refusal and train.gradient_checkpointing
auto, and bad input through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import base_config, write_config
from test_catalogue import ADAPTER_CASES, write_output

from rayft.config import parse_config
from rayft.errors import ConfigError, RayftError
from rayft.estimate import GiB, Device, estimate, parse_device, preflight_estimate

CPU_64G = Device("cpu", 64 * GiB)

# method x ZeRO stage x gradient checkpointing; QLoRA with ZeRO-3 is refused by the config
GRID = [(method, zero, checkpointing) for method in ("full", "lora") for zero in (0, 3) for checkpointing in (False, True)] \
    + [("qlora", 0, checkpointing) for checkpointing in (False, True)]


def config_of(tmp_path: Path, model: Path, cutoff_len: int = 128, **sections) -> dict:
    """conftest's base config (its data file is never read here) with data.cutoff_len."""
    raw = base_config(tmp_path, model, tmp_path / "unused.jsonl", **sections)
    raw["data"]["cutoff_len"] = cutoff_len
    return raw


def grid_config(tmp_path: Path, model: Path, method: str, zero: int, checkpointing: bool) -> dict:
    block = {"type": method, **({method: {"r": 8, "dropout": 0.0}} if method != "full" else {})}
    # auto: bf16 where this CPU has it natively (the estimate resolves it the same way), else fp32
    return config_of(tmp_path, model, method=block, distributed={"num_workers": 1, "zero_stage": zero},
                     train={"precision": "auto", "gradient_checkpointing": checkpointing, "micro_batch_size": 4})


def predicted(raw: dict, model: Path, device: Device = CPU_64G, **kwargs):
    return estimate(parse_config(raw), model, device, peak_tflops=1.0, advise=False, **kwargs)


@pytest.mark.slow  # ten configurations x two measured steps: 34 s on a quiet machine (2026-12-02); make test-slow runs it
def test_predicted_peaks_are_within_25_percent_of_the_measured_ones(tmp_path, tiny_model):
    """The peak of allocated tensor bytes over two real steps (rayft.measure: the CPU allocator's
    own count through torch.profiler, one process, DeepSpeed at world size 1) against the estimate,
    for each cell of the grid."""
    raws = [grid_config(tmp_path, tiny_model, *cell) for cell in GRID]
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps(raws))
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "peak_probe.py"), str(configs)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(measured) == len(GRID)
    peaks = {}
    for cell, raw, result in zip(GRID, raws, measured):
        estimated = predicted(raw, tiny_model)
        peaks[cell] = (estimated.peak_bytes, result["peak_bytes"])
        assert peaks[cell][0] == pytest.approx(peaks[cell][1], rel=0.25), (cell, peaks[cell])
        weights = next(term for term in estimated.terms if term.name == "weights").bytes["forward"]
        assert weights == pytest.approx(result["loaded_bytes"], rel=0.01), cell  # the weights as loaded, exactly
        if cell[1] == 0:  # the count closes: what the window allocated is freed with the engine (a few
            # bytes stay in a library's cache; a free the profiler missed would leave megabytes)
            assert result["left_bytes"] < 1e-3 * result["peak_bytes"], (cell, result)
    for method, zero, _ in GRID:  # checkpointing lowers both, the prediction and the measurement
        assert all(p < q for p, q in zip(peaks[(method, zero, True)], peaks[(method, zero, False)])), (method, zero)
    with pytest.raises(ConfigError, match="qlora cannot run with distributed.zero_stage=3"):
        parse_config(grid_config(tmp_path, tiny_model, "qlora", 3, False))


def test_qlora_weights_count_half_a_byte_each_plus_their_quantisation_state(tmp_path, tiny_model):
    """The estimate's QLoRA weights equal the bytes of the loaded model's tensors: the other
    parameters, and per 4-bit weight its packed bytes, absmax and double-quantisation state. And
    the process holds nothing else: the checkpoint file is no longer memory-mapped (transformers
    leaves the unquantised parameters as views of the map, which would keep the whole fp32 file
    resident beside the 4-bit weights; methods/qlora.py copies them)."""
    import shutil

    import torch

    from rayft.config import MethodConfig
    from rayft.models.loading import load_for_training

    private = shutil.copytree(tiny_model, tmp_path / "model")  # a file no other test's model maps
    block = {"type": "qlora", "qlora": {"r": 8}}
    model = load_for_training(private, MethodConfig.model_validate(block), torch.device("cpu"))
    assert str(private / "model.safetensors") not in Path("/proc/self/maps").read_text()
    stored, quantised = 0, 0
    for param in model.parameters():
        stored += param.untyped_storage().nbytes()
        state = getattr(param, "quant_state", None)
        if state is not None:
            quantised += 1
            nested = [state.state2.absmax, state.state2.code] if state.nested else []
            stored += sum(t.untyped_storage().nbytes() for t in (state.absmax, state.code, *nested))
    assert quantised == 14  # every linear layer of the 2 decoder layers
    raw = base_config(tmp_path, tiny_model, tmp_path / "unused.jsonl", method=block)
    weights = next(term for term in predicted(raw, tiny_model).terms if term.name == "weights").bytes["forward"]
    assert weights == pytest.approx(stored, rel=0.01)


def test_lora_under_bf16_counts_the_frozen_linear_weights_it_stores_in_bf16(tmp_path, tiny_model):
    """Under bf16 LoRA stores its frozen linear weights in bf16 (methods/lora.py) and lets the
    checkpoint's memory map go. The estimate's weights term equals the loaded model's tensors'
    bytes with that storage and without it (ZeRO-3, fp32), and its loading moment is the file
    plus what was built beside it."""
    import shutil

    import torch

    from rayft.config import MethodConfig
    from rayft.methods import Run
    from rayft.models.loading import load_for_training

    private = shutil.copytree(tiny_model, tmp_path / "model")  # a file no other test's model maps
    block = {"type": "lora", "lora": {"r": 8, "dropout": 0.0}}
    for precision, zero, in_bf16 in [("bf16", 2, True), ("bf16", 3, False), ("fp32", 2, False)]:
        model = load_for_training(private, MethodConfig.model_validate(block), torch.device("cpu"),
                                  run=Run(precision=precision, zero_stage=zero))
        assert (torch.bfloat16 in {p.dtype for p in model.parameters()}) == in_bf16, (precision, zero)
        stored = sum(p.untyped_storage().nbytes() for p in model.parameters())
        raw = base_config(tmp_path, private, tmp_path / "unused.jsonl", method=block,
                          train={"precision": precision}, distributed={"num_workers": 1, "zero_stage": zero})
        result = predicted(raw, private)
        terms = {term.name: term for term in result.terms}
        assert terms["weights"].bytes["forward"] == pytest.approx(stored, rel=0.01), (precision, zero)
        assert ("frozen linear weights 2 bytes each" in terms["weights"].note) == in_bf16
        # with bf16 storage none of its tensors views the checkpoint file any more
        file_bytes = (private / "model.safetensors").stat().st_size
        assert (str(private / "model.safetensors") in Path("/proc/self/maps").read_text()) != in_bf16
        adapters = 4 * result.trainable_params  # made after loading, by the method
        loading = terms["checkpoint, loading"].bytes["loading"]
        assert loading == pytest.approx(file_bytes + (stored - adapters if in_bf16 else 0)), (precision, zero)
        del model


def test_loading_on_cpu_counts_the_mapped_checkpoint_and_what_is_built_beside_it(tmp_path, tiny_model):
    """On CPU the checkpoint file is memory-mapped while loading (and the profiler counts it): an
    fp32 file loaded in fp32 is the weights themselves; QLoRA builds its 4-bit weights and fp32
    copies of the rest beside it. On a GPU the map is host memory: nothing at that moment."""
    file_bytes = (tiny_model / "model.safetensors").stat().st_size

    def estimated(block, device):
        result = predicted(base_config(tmp_path, tiny_model, tmp_path / "unused.jsonl", method=block), tiny_model,
                           device)
        return result, {term.name: term for term in result.terms}

    _, full = estimated({"type": "full"}, CPU_64G)
    assert full["checkpoint, loading"].bytes["loading"] == file_bytes
    result, qlora = estimated({"type": "qlora", "qlora": {"r": 8}}, CPU_64G)
    adapters = 4 * result.trainable_params  # made after loading, by the method
    assert qlora["checkpoint, loading"].bytes["loading"] == pytest.approx(
        file_bytes + qlora["weights"].bytes["forward"] - adapters)
    for term in qlora.values():  # the moment holds the loading term only
        assert term.name == "checkpoint, loading" or term.bytes["loading"] == 0
    _, on_gpu = estimated({"type": "qlora", "qlora": {"r": 8}}, Device("cuda", 80 * GiB))
    assert not any(on_gpu["checkpoint, loading"].bytes.values())


def test_packed_attention_on_a_gpu_in_bf16_keeps_its_keys_and_values_unexpanded(tmp_path, tiny_model):
    """On a GPU in bf16 the packed attention is the flash kernel's varlen attention, which reads
    the keys and values in their key-value heads: per layer it keeps 2 (1 - kv_heads / heads)
    tokens x hidden compute-dtype elements less than sdpa, which expands them to every head."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    cuda = Device("cuda", 80 * GiB)

    def kept(attention: str) -> float:
        raw = config_of(tmp_path, tiny_model, train={"precision": "bf16", "attention": attention, "micro_batch_size": 2})
        return next(t for t in predicted(raw, tiny_model, cuda).terms if t.name == "activations").bytes["forward"]

    tokens = 2 * 128
    expected = (config.num_hidden_layers * 2 * (1 - config.num_key_value_heads / config.num_attention_heads)
                * tokens * config.hidden_size * 2)
    assert config.num_key_value_heads < config.num_attention_heads and kept("sdpa") - kept("packed") == pytest.approx(expected)


def test_parse_device():
    assert parse_device("cuda:80GB") == Device("cuda", 80 * GiB)
    assert parse_device("cpu:24GiB") == Device("cpu", 24 * GiB)
    assert parse_device("GPU:1.5TB") == Device("cuda", int(1.5 * (1 << 40)))
    assert parse_device("cpu:512MB") == Device("cpu", 512 << 20)
    for bad in ("cuda:lots", "tpu:8GB", "cuda:80", "cuda:0GB", "80GB", ""):
        with pytest.raises(RayftError, match="expected cuda:<memory> or cpu:<memory>"):
            parse_device(bad)


def every_method(tiny_model, tiny_qwen2, tmp_path):
    cases = {name: spec for name, spec in ADAPTER_CASES.items()}
    cases.update({"full": ({"type": "full"}, "llama"), "freeze": ({"type": "freeze", "freeze": {"trainable_layers": 1}},
                                                                  "llama"),
                  "lora": ({"type": "lora", "lora": {"r": 8}}, "llama"),
                  "dora": ({"type": "lora", "lora": {"r": 8, "use_dora": True}}, "llama"),
                  "qlora": ({"type": "qlora", "qlora": {"r": 8}}, "llama")})
    adapters = [str(write_output(tiny_model, {"type": "bottleneck", "bottleneck": {"reduction_factor": 8}},
                                 tmp_path / f"task{i}", seed=i)) for i in range(2)]
    cases["adapter_fusion"] = ({"type": "adapter_fusion", "adapter_fusion": {"adapters": adapters}}, "llama")
    return {name: (block, tiny_model if shape == "llama" else tiny_qwen2) for name, (block, shape) in cases.items()}


def test_every_method_is_estimated_on_the_meta_device_with_its_exact_parameter_counts(tmp_path, tiny_model, tiny_qwen2):
    """Each method of the catalogue applied by its own apply() on the meta device counts exactly the
    trainable and total parameters of the model a worker loads (4-bit weights by their unpacked
    size), and only what trains has gradients and optimizer states."""
    import torch

    from rayft.config import MethodConfig
    from rayft.methods import Run
    from rayft.models.loading import count_parameters, load_for_training

    for name, (block, model) in every_method(tiny_model, tiny_qwen2, tmp_path).items():
        zero = 2 if block["type"] in ("qlora", "adalora", "plora") else 3
        raw = base_config(tmp_path, model, tmp_path / "unused.jsonl", method=block, distributed={"zero_stage": zero})
        result = predicted(raw, model)
        loaded = load_for_training(model, MethodConfig.model_validate(block), torch.device("cpu"), run=Run(total_steps=10))
        assert (result.trainable_params, result.total_params) == count_parameters(loaded), name
        terms = {term.name: term for term in result.terms}
        assert terms["optimizer states"].bytes["step"] == pytest.approx(8 * result.trainable_params / 2), name  # AdamW, / 2 ranks
        assert result.peak_bytes > terms["weights"].bytes["forward"] > 0, name


def test_dpo_rows_hold_two_sequences_and_a_disabled_adapter_adds_a_reference_pass(tmp_path, tiny_model):
    """stage dpo: a row holds a pair's two sequences, so 4 rows of pairs keep the activations of 8
    SFT rows of cutoff_len (the same tokens, each sequence attending to itself); the
    adapter_disabled reference adds a forward pass (FLOPs, and its logits in the forward's memory)
    that the precomputed one does not."""
    lora = {"type": "lora", "lora": {"r": 8}}

    def config(stage, rows, **dpo):
        return config_of(tmp_path, tiny_model, 128, method=lora, train={"micro_batch_size": rows},
                         **({"stage": "dpo", "dpo": dpo} if dpo else {}))

    def terms(result):
        return {term.name: term for term in result.terms}

    sft_double = predicted(config("sft", 8), tiny_model)
    precomputed = predicted(config("dpo", 4, reference="precomputed"), tiny_model)
    disabled = predicted(config("dpo", 4, reference="adapter_disabled"), tiny_model)
    assert terms(precomputed)["activations"].bytes["forward"] == pytest.approx(terms(sft_double)["activations"].bytes["forward"])
    # per-sequence sums come from the fused head's per-token log-probabilities: no full logits
    assert terms(precomputed)["output head and loss"].note == "fused, chunked"
    assert disabled.flops_per_step > precomputed.flops_per_step
    assert terms(disabled)["output head and loss"].bytes["forward"] > terms(precomputed)["output head and loss"].bytes["forward"]


def test_a_reference_model_adds_a_frozen_copy_sharded_as_the_policy(tmp_path, tiny_model):
    """stage dpo with reference model (full fine-tuning): each rank keeps a frozen copy of the
    model, a ZeRO-3 shard of it under ZeRO-3 (its weights sharded as the policy's), the whole fp32
    module under ZeRO 0-2, at every phase; the precomputed reference keeps none."""
    def terms(zero, reference):
        raw = config_of(tmp_path, tiny_model, 128, method={"type": "full"}, stage="dpo", dpo={"reference": reference},
                        distributed={"zero_stage": zero, "zero3_persistence_threshold": 0})
        return {term.name: term for term in predicted(raw, tiny_model).terms}

    for zero in (2, 3):
        frozen, precomputed = terms(zero, "model"), terms(zero, "precomputed")
        copy = {phase: value for phase, value in frozen["reference model"].bytes.items() if phase != "loading"}
        assert set(copy.values()) == {frozen["weights"].bytes["forward"]}, zero  # the policy's weights, stored alike
        assert ("sharded / 2" in frozen["reference model"].note) == (zero == 3)
        assert not any(precomputed["reference model"].bytes.values())
        assert frozen["weights"].bytes == precomputed["weights"].bytes


def test_advice_names_changes_that_each_fit_when_estimated_alone(tmp_path, tiny_model):
    """A full fine-tuning run that does not fit: half the micro-batch (twice the accumulation) is
    offered as fitting, and every change offered has, estimated alone, the need and verdict the
    advice gives it."""
    from rayft.estimate import candidate_changes

    def config(rows, accum=1):
        return parse_config(config_of(tmp_path, tiny_model, 512, method={"type": "full"},
                                      train={"micro_batch_size": rows, "grad_accum": accum}))

    whole = estimate(config(8), tiny_model, CPU_64G, peak_tflops=1.0, advise=False)
    half = estimate(config(4, 2), tiny_model, CPU_64G, peak_tflops=1.0, advise=False)
    assert half.needed_bytes < whole.needed_bytes
    device = Device("cpu", int((whole.needed_bytes + half.needed_bytes) / 2))
    result = estimate(config(8), tiny_model, device, peak_tflops=1.0)
    assert not result.fits
    assert "train.micro_batch_size=4 with train.grad_accum=2" in [label for label, _, fits in result.advice if fits]
    changes = {label: (changed, ckpt) for label, changed, ckpt in candidate_changes(config(8), device, False)}
    for label, needed, fits in result.advice:
        changed, ckpt = changes[label]
        alone = estimate(changed, tiny_model, device, peak_tflops=1.0, checkpointing=ckpt, advise=False)
        assert alone.needed_bytes == pytest.approx(needed) and alone.fits == fits, label
        assert needed < result.needed_bytes, label


def small_gpu(monkeypatch, device: Device):
    monkeypatch.setattr("rayft.estimate.worker_device", lambda cfg, use_gpu: device)


def test_preflight_refuses_a_gpu_run_that_does_not_fit_unless_forced_and_warns_on_cpu(tmp_path, tiny_model, monkeypatch):
    raw = base_config(tmp_path, tiny_model, tmp_path / "unused.jsonl", method={"type": "full"})
    small_gpu(monkeypatch, Device("cuda", GiB))
    lines = []
    with pytest.raises(RayftError) as refused:
        preflight_estimate(parse_config(raw), tiny_model, use_gpu=True, say=lines.append)
    message = str(refused.value)
    assert "\n" not in message and "per worker does not fit cuda:1GB" in message and message.endswith("--force runs it anyway")
    assert "fits with:" in message or "closest" in message
    preflight_estimate(parse_config(raw), tiny_model, use_gpu=True, force=True, say=lines.append)
    assert len(lines) == 1 and lines[0].startswith("[rayft] warning: predicted peak")
    small_gpu(monkeypatch, Device("cpu", GiB))
    preflight_estimate(parse_config(raw), tiny_model, use_gpu=False, say=lines.append)
    assert len(lines) == 2 and lines[1].endswith("(CPU: warned, not refused)")


def test_gradient_checkpointing_auto_turns_on_only_where_it_makes_the_run_fit(tmp_path, tiny_model, monkeypatch):
    def config(method=None, **train):
        return parse_config(config_of(tmp_path, tiny_model, 512, method=method or {"type": "full"},
                                      train={"micro_batch_size": 8, **train}))

    off = estimate(config(), tiny_model, CPU_64G, peak_tflops=1.0, advise=False, checkpointing=False)
    on = estimate(config(), tiny_model, CPU_64G, peak_tflops=1.0, advise=False, checkpointing=True)
    assert on.needed_bytes < off.needed_bytes
    for device_bytes, expected in (((on.needed_bytes + off.needed_bytes) / 2, True), (2 * off.needed_bytes, False),
                                   (on.needed_bytes / 2, False)):
        small_gpu(monkeypatch, Device("cpu", int(device_bytes)))
        cfg, lines = config(gradient_checkpointing="auto"), []
        preflight_estimate(cfg, tiny_model, use_gpu=False, say=lines.append)
        assert cfg.train.gradient_checkpointing is expected
        assert lines[0].startswith(f"[rayft] train.gradient_checkpointing auto: {'on' if expected else 'off'} (")
    prefix = config(ADAPTER_CASES["prefix_tuning"][0], gradient_checkpointing="auto")  # refuses checkpointing
    small_gpu(monkeypatch, Device("cpu", int((on.needed_bytes + off.needed_bytes) / 2)))
    lines = []
    preflight_estimate(prefix, tiny_model, use_gpu=False, say=lines.append)
    assert prefix.train.gradient_checkpointing is False and "method.type=prefix_tuning cannot run with it" in lines[0]


def test_estimate_command_prints_the_table_and_the_advice(tmp_path, tiny_model):
    from rayft.cli import app

    config = write_config(tmp_path, base_config(tmp_path, tiny_model, tmp_path / "unused.jsonl", method={"type": "full"}))
    runner = CliRunner()
    fits = runner.invoke(app, ["estimate", str(config), "--device", "cpu:64GB", "--peak-tflops", "0.5"])
    assert fits.exit_code == 0, fits.output
    for text in ("activations", "output head and loss", "optimizer states", "fits", "rule of thumb", "per step",
                 "for 6 steps"):
        assert text in fits.output, text
    # 16 rows: the fused head's logits gradient (16 x 127 x 49152 in bf16/fp32) outgrows a worker of 1.3 GB
    tight = runner.invoke(app, ["estimate", str(config), "--device", "cpu:1.3GB", "--set", "train.micro_batch_size=16",
                                "--peak-tflops", "0.5"])
    assert tight.exit_code == 0, tight.output
    assert "does NOT fit" in tight.output and "fits with train.micro_batch_size=4 with train.grad_accum=4" in tight.output


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:lots"], "error: --device 'cuda:lots': expected cuda:<memory> or cpu:<memory>, e.g. cuda:80GB"),
    (["--device", "tpu:16GB"], "error: --device 'tpu:16GB': expected cuda:<memory> or cpu:<memory>"),
    (["--peak-tflops", "0"], "error: --peak-tflops 0: must be positive"),
    (["--set", "train.micro_batch_size=0"], "train.micro_batch_size=0: Input should be greater than 0"),
])
def test_estimate_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model, args, message):
    from rayft.cli import app

    config = write_config(tmp_path, base_config(tmp_path, tiny_model, tmp_path / "unused.jsonl"))
    done = CliRunner().invoke(app, ["estimate", str(config), *args])
    assert done.exit_code == 2, done.output
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.output
