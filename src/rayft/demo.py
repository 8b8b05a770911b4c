"""`rayft demo`: write a small instruction data set, fine-tune SmolLM2-135M on it with
pipelines/demo_lora.yaml (2 workers, ZeRO-2), and show the model before and after."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rayft.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "pipelines" / "demo_lora.yaml"
INSTRUCTION = "Extract the person as one line of JSON with keys name, age, job, city."
NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yusuf"]
JOBS = ["teacher", "nurse", "baker", "engineer", "farmer", "chef", "lawyer", "painter", "plumber", "doctor"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Rome", "Seoul", "Dakar", "Hanoi", "Bogota", "Perth"]
TEMPLATES = ["{name} is {age} years old, works as a {job} and lives in {city}.",
             "Meet {name}, a {age}-year-old {job} from {city}.",
             "{name} ({age}) has been a {job} in {city} for years.",
             "Living in {city}, {name} is a {job} aged {age}."]
HELD_OUT = ["Marta is 41 years old, works as a pilot and lives in Lisbon.",
            "Meet Kenji, a 29-year-old architect from Osaka."]


def write_demo_data(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        person = {"name": rng.choice(NAMES), "age": rng.randint(18, 80), "job": rng.choice(JOBS), "city": rng.choice(CITIES)}
        text = rng.choice(TEMPLATES).format(**person)
        lines.append(json.dumps({"instruction": INSTRUCTION, "input": text, "output": json.dumps(person)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


RAMBLES = ["Well, let me think about this person for a moment. {text} That is quite a story, and there is a lot "
           "one could say about it.",
           "Sure! Here is what I can tell you: the text talks about somebody. {text} I hope this helps!",
           "{name}? Interesting. People like {name} often have fascinating lives; this one is {age}, I believe."]


def write_preference_data(path: Path, n: int = 200, seed: int = 0) -> Path:
    """Preference pairs on the demo task: chosen answers are the requested one-line JSON, rejected
    ones ramble in prose (a change DPO makes visible). Plain form: {prompt, chosen, rejected}."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        person = {"name": rng.choice(NAMES), "age": rng.randint(18, 80), "job": rng.choice(JOBS), "city": rng.choice(CITIES)}
        text = rng.choice(TEMPLATES).format(**person)
        lines.append(json.dumps({"prompt": f"{INSTRUCTION}\n\n{text}", "chosen": json.dumps(person),
                                 "rejected": rng.choice(RAMBLES).format(text=text, **person)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def generate_answers(model_dir: Path, adapter_dir: Path | None, prompts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{prompt}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def run_demo(output_dir: Path, config: Path = DEMO_CONFIG) -> dict:
    """Write the demo data sets, train `config` (the SFT demo by default; pipelines/dpo_lora.yaml
    aligns with preference pairs) and show the held-out answers and evaluations before and after."""
    from rich.console import Console
    from rich.table import Table

    from rayft.config import read_yaml
    from rayft.console import LOG_DIR, output_into, verbose_from_env
    from rayft.models import resolve_model_path
    from rayft.train.runner import run_training

    console = Console()
    data_dir = Path(output_dir) / "data"
    written = {path.name: path for path in (write_demo_data(data_dir / "people.jsonl"),
                                            write_preference_data(data_dir / "preferences.jsonl"))}
    data_name = Path(read_yaml(config)["data"]["train"]).name
    overrides = [f"data.train={written.get(data_name, data_dir / data_name)}"]
    if Path(config) == DEMO_CONFIG:
        overrides.append(f"output_dir={Path(output_dir) / 'run'}")
    cfg = load_config(config, overrides)
    log = Path(output_dir) / LOG_DIR / "demo.log"
    with output_into(log, verbose_from_env()):  # the base's one-time conversion reports its progress there
        model_dir = resolve_model_path(cfg.model.name_or_path)
    console.print(f"[bold]rayft demo[/]: {Path(config).name} ({cfg.stage}, {cfg.method.type}) on {cfg.model.name_or_path}, "
                  f"{cfg.distributed.num_workers} Ray Train workers, ZeRO-{cfg.distributed.zero_stage}, data {cfg.data.train}")
    # the generations' library output (weights loading, warnings) goes to the demo's log too
    with output_into(log, verbose_from_env()):
        before = generate_answers(model_dir, None, HELD_OUT)
    metrics = run_training(cfg, overwrite=True)  # its progress bar on the console, the rest in its logs
    with output_into(log, verbose_from_env()):
        after = generate_answers(model_dir, Path(metrics["output"]), HELD_OUT)

    table = Table(title="before / after fine-tuning", show_lines=True)
    table.add_column("")
    table.add_column("before")
    table.add_column("after")
    table.add_row("eval loss", f"{metrics['eval_loss_before']:.3f}", f"{metrics['eval_loss']:.3f}")
    for key in sorted(k for k in metrics if k.startswith("eval_") and f"{k}_before" in metrics and k != "eval_loss"):
        if metrics[key] is not None and metrics[f"{key}_before"] is not None:
            table.add_row(key.removeprefix("eval_").replace("_", " "), f"{metrics[f'{key}_before']:.3f}", f"{metrics[key]:.3f}")
    for prompt, old, new in zip(HELD_OUT, before, after):
        table.add_row(prompt, old, new)
    console.print(table)
    console.print(f"adapter: {metrics['output']}\nlogs: {Path(metrics['output']).parent / LOG_DIR}/ and {log}\n"
                  f"MLflow run: {metrics['mlflow_run_id']} "
                  f"(store {Path('mlflow.db').resolve()}; `mlflow ui --backend-store-uri sqlite:///mlflow.db`)\n"
                  f"throughput: {metrics['tokens_per_s']:.0f} tokens/s over {metrics['steps']} steps")
    return metrics
