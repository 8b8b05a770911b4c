import pytest
import torch

from rayft.config import MethodConfig
from rayft.errors import ConfigError
from rayft.methods import get_method, register
from rayft.methods.base import Method
from rayft.models.loading import count_parameters, load_for_training, load_on_meta

CPU = torch.device("cpu")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_lora_at_init_leaves_outputs_unchanged(tiny_model):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 1000, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for flags in ({}, {"use_rslora": True}, {"use_dora": True}):
        model = load_for_training(tiny_model, MethodConfig(type="lora", lora=flags), CPU).eval()
        torch.testing.assert_close(logits(model, ids), logits(base, ids))


def test_models_load_without_hub_kernels(tiny_model, monkeypatch):
    """transformers 5 swaps a loaded model's layers for kernels it downloads from the Hugging Face
    Hub unless USE_HUB_KERNELS says no (on an H200 without a hub every load then failed at its
    first forward). Importing rayft says no; a user's own setting is kept."""
    import importlib
    import os

    import rayft

    assert os.environ["USE_HUB_KERNELS"] == "NO"
    assert not load_for_training(tiny_model, MethodConfig(type="lora"), CPU).get_base_model().use_kernels
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    importlib.reload(rayft)
    assert os.environ["USE_HUB_KERNELS"] == "YES"


def test_lora_switches_reach_peft(tiny_model):
    model = load_for_training(tiny_model, MethodConfig(type="lora", lora={"r": 4, "alpha": 8, "use_rslora": True,
                                                                          "use_dora": True}), CPU)
    peft_config = model.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.use_rslora, peft_config.use_dora) == (4, 8, True, True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA's magnitude trains too


def test_freeze_trains_only_the_last_layers(tiny_model):
    model = load_for_training(tiny_model, MethodConfig(type="freeze", freeze={"trainable_layers": 1}), CPU)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.")) for n in trainable)
    with pytest.raises(ConfigError, match="trainable_layers=5: the model has only 2 layers"):
        get_method("freeze").check(MethodConfig(type="freeze", freeze={"trainable_layers": 5}).options, load_on_meta(tiny_model))


def test_full_trains_everything(tiny_model):
    model = load_for_training(tiny_model, MethodConfig(type="full"), CPU)
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_qlora_layers_are_4bit_nf4(tiny_model):
    import bitsandbytes as bnb

    model = load_for_training(tiny_model, MethodConfig(type="qlora"), CPU)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for module in quantized:
        assert module.weight.quant_type == "nf4" and module.weight.dtype == torch.uint8
        assert module.weight.quant_state.nested  # double quantization
        assert module.compute_dtype == torch.bfloat16
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_absent_target_modules_list_the_existing_ones(tiny_model):
    cfg = MethodConfig(type="lora", lora={"target_modules": ["q_proj", "query_key_value"]})
    with pytest.raises(ConfigError) as error:
        get_method("lora").check(cfg.options, load_on_meta(tiny_model))
    assert "['query_key_value'] not in the model" in str(error.value)
    assert "q_proj" in str(error.value) and "down_proj" in str(error.value)


def test_registering_a_name_twice_fails_loudly():
    class Again(Method):
        name = "lora"

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)


@pytest.mark.parametrize("flags", [{}, {"use_dora": True}])
def test_skipping_peft_input_casts_under_autocast_changes_no_number(tiny_model, flags):
    from rayft.methods.lora import keep_adapter_inputs_in_autocast_dtype

    ids = torch.randint(0, 1000, (2, 12))
    results = []
    for skip in (False, True):
        torch.manual_seed(0)
        model = load_for_training(tiny_model, MethodConfig(type="lora", lora={**flags, "dropout": 0.0}), CPU)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)  # B starts at zero: give the adapter path something to do
        unfuse_lora_layers(model)  # peft's own forward, whose input casts this is about
        if skip:
            keep_adapter_inputs_in_autocast_dtype(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, use_cache=False).logits.float()
        out.square().mean().backward()
        results.append((out, [p.grad for p in model.parameters() if p.requires_grad]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def unfuse_lora_layers(model) -> int:
    """Back to peft's forward in every LoRA layer (rayft binds its fused one per layer)."""
    fused = [module for module in model.modules() if "forward" in vars(module)]
    for module in fused:
        del module.forward
    return len(fused)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_lora_layers_compute_what_peft_computes(tiny_model, precision):
    """rayft's plain LoRA layers add s (x A^T) B^T to the base output in one addmm. In fp32 that
    is peft's result; under bf16 autocast it is the same sum rounded once instead of three
    times, so against an fp32 computation it is at least as close as peft's own bf16 forward, over
    several inputs (on one input either may be the closer: 2 of 12 were peft's)."""
    inputs = [torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(seed)) for seed in range(4)]

    def run(fused: bool, autocast: bool, ids: torch.Tensor):
        torch.manual_seed(0)
        model = load_for_training(tiny_model, MethodConfig(type="lora", lora={"dropout": 0.0}), CPU)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)  # B starts at zero: give the adapter path something to do
        layers = unfuse_lora_layers(model) if not fused else sum("forward" in vars(m) for m in model.modules())
        assert layers == 7 * model.config.num_hidden_layers  # every linear layer of every block
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, use_cache=False).logits.float()
        out.square().mean().backward()
        with torch.no_grad(), model.disable_adapter():  # the reference of DPO: the base alone, via peft
            base = model(input_ids=ids, use_cache=False).logits
        return [out.detach(), *[p.grad for p in model.parameters() if p.requires_grad]], base

    peft_errors, fused_errors = [], []
    for ids in inputs[:1] if precision == "fp32" else inputs:
        exact, exact_base = run(fused=False, autocast=False, ids=ids)
        if precision == "fp32":
            fused, fused_base = run(fused=True, autocast=False, ids=ids)
            for a, b in zip(fused, exact):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert torch.equal(fused_base, exact_base)
            return

        def error(values):  # relative to the fp32 computation, per tensor
            return [((a - b).norm() / b.norm()).item() for a, b in zip(values, exact)]

        peft_errors += error(run(fused=False, autocast=True, ids=ids)[0])
        fused_errors.append(error(run(fused=True, autocast=True, ids=ids)[0]))
        assert fused_errors[-1][0] < 0.02  # the logits (the gradients' bf16 errors are 2-5% on either path)
    assert sum(map(sum, fused_errors)) <= 1.05 * sum(peft_errors), (fused_errors, peft_errors)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_decoder_layers_compute_what_eager_layers_compute(tiny_model, precision):
    """train.compile: the loss step through torch.compile'd decoder layers (rayft's packed
    attention running eager inside them, two samples per packed row, rows of two widths) gives the
    eager step's loss and gradients in fp32. Under bf16 autocast inductor rounds fused
    intermediates (SwiGLU, RoPE) once instead of per op, so against the fp32 computation it is at
    least as close as the eager bf16 step. Evaluation (no grad) compiles and agrees too, and so
    does the fp32 step with gradient checkpointing."""
    from tiny import packed_batches
    from torch._dynamo.utils import counters
    from transformers import AutoTokenizer

    from rayft.models.loading import compile_decoder_layers
    from rayft.train.attention import ATTENTION_NAME
    from rayft.train.loop import token_losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batches = packed_batches(tokenizer)
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]  # the token count varies
    assert (batches[0]["position_ids"] == 0).sum() > batches[0]["input_ids"].shape[0]  # packed rows

    def run(compiled: bool, step_precision: str, checkpointing: bool = False):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = load_for_training(tiny_model, MethodConfig(type="lora", lora={"dropout": 0.0}), CPU,
                                  gradient_checkpointing=checkpointing)
        assert model.config._attn_implementation == ATTENTION_NAME
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)  # B starts at zero: give the adapter path something to do
        if compiled:
            assert compile_decoder_layers(model) == model.config.num_hidden_layers
        results = []
        for batch in batches:
            model.zero_grad()
            loss, count = token_losses(model, batch, step_precision)
            (loss / count).backward()
            results += [loss.detach(), *[p.grad.clone() for p in model.parameters() if p.requires_grad]]
        with torch.no_grad():
            results.append(token_losses(model, batches[0], step_precision)[0])
        # the compiled layers did run as graphs, made (or taken from the disk cache) by inductor
        compiled_graphs = counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"]
        assert (counters["stats"]["unique_graphs"] > 0 and compiled_graphs > 0) == compiled
        return results

    exact = run(compiled=False, step_precision="fp32")
    if precision == "fp32":
        for checkpointing in (False, True):  # layers recomputed in the backward: compiled there too
            for a, b in zip(run(compiled=True, step_precision="fp32", checkpointing=checkpointing), exact):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return

    def error(values):  # relative to the fp32 computation, per tensor
        return [((a - b).norm() / b.norm()).item() for a, b in zip(values, exact)]

    eager_error, compiled_error = error(run(compiled=False, step_precision="bf16")), \
        error(run(compiled=True, step_precision="bf16"))
    assert max(compiled_error) < 0.1
    assert sum(compiled_error) <= 1.05 * sum(eager_error), (compiled_error, eager_error)


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_under_bf16_stores_the_frozen_linear_weights_in_bf16_and_computes_the_same(tiny_model, targets):
    """Under bf16 autocast every use of a frozen linear weight is a matmul that casts it to bf16
    first, so LoRA stores it in bf16 (autocast then casts none per forward). The loss, every
    gradient and the base's own output (DPO's reference: the adapter disabled) are bit for bit
    those of the same model with its fp32 weights (random ones here: not bf16 values), for
    wrapped and unwrapped linears alike. The tied embeddings/head and the norms stay fp32; an fp32
    run and a ZeRO-3 run store nothing in bf16."""
    from rayft.methods import Run

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    method = MethodConfig(type="lora", lora={"dropout": 0.0, "target_modules": targets})

    def step(model):
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            with torch.no_grad(), model.disable_adapter():
                base = model(input_ids=ids, use_cache=False).logits
        loss.backward()
        return [loss.detach(), base, *[p.grad for p in model.parameters() if p.requires_grad]]

    torch.manual_seed(1)  # LoRA's A starts random
    stored = load_for_training(tiny_model, method, CPU, run=Run(precision="bf16"))
    frozen = {name: p.dtype for name, p in stored.named_parameters() if not p.requires_grad}
    linear = {name: dtype for name, dtype in frozen.items() if "proj" in name and name.endswith("weight")}
    assert len(linear) == 7 * stored.config.num_hidden_layers and set(linear.values()) == {torch.bfloat16}
    assert {dtype for name, dtype in frozen.items() if name not in linear} == {torch.float32}  # norms, embeddings
    assert stored.get_output_embeddings().weight.dtype == torch.float32  # tied to the embeddings
    torch.manual_seed(1)
    reference = load_for_training(tiny_model, method, CPU, run=Run(precision="fp32"))
    assert {p.dtype for p in reference.parameters()} == {torch.float32}
    for ours, theirs in zip(step(stored), step(reference)):
        assert torch.equal(ours, theirs)

    under_zero3 = load_for_training(tiny_model, method, CPU, run=Run(precision="bf16", zero_stage=3))
    assert {p.dtype for p in under_zero3.parameters()} == {torch.float32}  # not run with mixed dtypes
