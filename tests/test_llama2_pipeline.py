"""The Llama-2 stack-exchange pipeline: data mapping, recipes, merge, data parallelism and the QLoRA path on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import stack_exchange
from trl_ext.data import keep_last_prompt_tokens, move_prompt_whitespace_to_completions, prepare_preference_pairs
from trl_ext.testing import build_tiny_llama

from .conftest import multi_cpu_launcher

ROOT = Path(__file__).resolve().parents[1]
ROW = {"question": "How do I reverse a list?", "response_j": "Use slicing: items[::-1].", "response_k": "Loop."}


def sample_rows(split: str) -> list[dict]:
    path = Path(stack_exchange.SAMPLE) / "data" / split / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def se_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama whose 1,000-token BPE, trained on the sample, merges a space into the next word."""
    corpus = [row[key] for split in ("finetune", "rl", "evaluation") for row in sample_rows(split)
              for key in stack_exchange.COLUMNS]
    corpus += [stack_exchange.sft_text(ROW)["text"]] * 20
    return build_tiny_llama(tmp_path_factory.mktemp("se-llama"), corpus, vocab_size=1000)


def test_sample_has_the_hub_layout():
    sizes = {split: len(stack_exchange.load_split(stack_exchange.SAMPLE, f"data/{split}"))
             for split in ("finetune", "rl", "evaluation")}
    assert sizes == {"finetune": 24, "rl": 24, "evaluation": 12}
    questions = {split: {row["question"] for row in sample_rows(split)} for split in sizes}
    assert not questions["evaluation"] & (questions["finetune"] | questions["rl"])
    with pytest.raises(ValueError, match=r"needs columns \['question', 'response_j', 'response_k'\]"):
        stack_exchange.load_split(str(ROOT / "recipes/data/penn"), ".")


def test_prompt_formats():
    assert stack_exchange.sft_text(ROW) == {
        "text": "Question: How do I reverse a list?\n\nAnswer: Use slicing: items[::-1]."}
    pair = move_prompt_whitespace_to_completions(stack_exchange.preference_pair(ROW))
    assert pair == {"prompt": "Question: How do I reverse a list?\n\nAnswer:", "chosen": " Use slicing: items[::-1].",
                    "rejected": " Loop."}


def test_boundary_fix_makes_the_prompt_a_token_prefix(se_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(se_model_dir)

    def prompt_is_prefix(pair):
        prompt_ids = tokenizer(pair["prompt"])["input_ids"]
        return tokenizer(pair["prompt"] + pair["chosen"])["input_ids"][: len(prompt_ids)] == prompt_ids

    raw = stack_exchange.preference_pair(ROW)
    assert not prompt_is_prefix(raw)  # "Answer: " ends in a lone space token; before "Use" the space merges
    fixed = move_prompt_whitespace_to_completions(raw)
    assert prompt_is_prefix(fixed)
    assert fixed["prompt"] + fixed["chosen"] == raw["prompt"] + raw["chosen"]  # the text is unchanged


def test_prompt_cap_keeps_the_end_in_tokens(se_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(se_model_dir)
    prompt = stack_exchange.preference_pair({**ROW, "question": " ".join(["Why is my list empty?"] * 40)})["prompt"]
    prompt = prompt.rstrip()
    assert len(tokenizer(prompt)["input_ids"]) > 64
    capped = keep_last_prompt_tokens({"prompt": prompt}, tokenizer, 64)["prompt"]
    assert 60 <= len(tokenizer(capped)["input_ids"]) <= 64
    assert prompt.endswith(capped) and capped.endswith("empty?\n\nAnswer:")
    short = {"prompt": "Question: Why?\n\nAnswer:"}
    assert keep_last_prompt_tokens(short, tokenizer, 64) == short
    with pytest.raises(ValueError, match="`max_prompt_tokens=0` leaves no room"):
        keep_last_prompt_tokens({"prompt": "Question: Why is my list empty?"}, tokenizer, 0)


def sentencepiece_style_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A tokenizer built as Llama-2's is: SentencePiece's "▁" word marks prepended to the first word, byte fallback,
    and a lone "▁" before text starting with a digit or a newline (it shares the next token's offsets)."""
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{value:02X}>" for value in range(256)]
    model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    model.pre_tokenizer = pre_tokenizers.Sequence([  # Llama's vocabulary splits digits: no "▁3"
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True)])
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_prompt_cap_with_a_sentencepiece_tokenizer():
    """Every cap from 10 to 60 tokens of a question full of numbers and line breaks keeps the prompt's end, within
    the cap, without leading whitespace (a lone "▁" token once made the cut fall at the text's start)."""
    question = " ".join(["my list 3 of 2024 values\nx = f(3)\n"] * 12)
    prompt = stack_exchange.preference_pair({**ROW, "question": question})["prompt"].rstrip()
    tokenizer = sentencepiece_style_tokenizer([prompt, ROW["response_j"], ROW["response_k"]] * 3)
    assert tokenizer.convert_ids_to_tokens(tokenizer("3 values", add_special_tokens=False)["input_ids"])[:2] == [
        "▁", "3"]
    for cap in range(10, 61):
        capped = keep_last_prompt_tokens({"prompt": prompt}, tokenizer, cap)["prompt"]
        assert len(tokenizer(capped)["input_ids"]) <= cap, cap
        assert prompt.endswith(capped) and capped.endswith("Answer:") and not capped[0].isspace(), cap


def test_pairs_over_max_length_are_dropped_not_truncated(se_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(se_model_dir)
    long_answer = " ".join(["Use slicing."] * 100)
    rows = [ROW, {**ROW, "response_j": long_answer}, {**ROW, "response_k": long_answer}]
    dataset = Dataset.from_list(rows).map(stack_exchange.preference_pair, remove_columns=list(stack_exchange.COLUMNS))
    prompt = stack_exchange.prompt_of(ROW["question"])
    lengths = [len(tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"])
               for answer in (ROW["response_j"], long_answer)]
    assert lengths[0] < 64 < lengths[1]
    prepared = prepare_preference_pairs(dataset, tokenizer, max_prompt_tokens=32, max_length=64)
    assert prepared.to_list() == [move_prompt_whitespace_to_completions(stack_exchange.preference_pair(ROW))]
    # The limit counts tokens: exactly the pair's length passes
    assert len(prepare_preference_pairs(dataset.select([0]), tokenizer, None, lengths[0])) == 1
    assert len(prepare_preference_pairs(dataset.select([0]), tokenizer, None, lengths[0] - 1)) == 0


@pytest.mark.parametrize(("name", "distributed_type", "mixed_precision"), [
    ("single_gpu", "NO", "bf16"), ("multi_gpu", "MULTI_GPU", "bf16"), ("deepspeed_zero2", "DEEPSPEED", "bf16"),
    ("deepspeed_zero3", "DEEPSPEED", "bf16"), ("fsdp", "FSDP", "bf16"), ("multi_cpu", "MULTI_GPU", "no"),
])
def test_accelerate_configs_load(name, distributed_type, mixed_precision):
    config = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    assert (config.distributed_type.value, config.mixed_precision) == (distributed_type, mixed_precision)
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])


def test_published_configs_hold_the_reference_setup():
    """What the recipes' `__main__` passes to `main` with no config named: the published YAML."""
    import llama2_dpo
    import llama2_sft

    data, sft, model = llama2_sft.parse_args(["--bf16", "false"])  # the YAML's bf16: true needs a GPU
    assert (model.model_name_or_path, model.load_in_4bit, model.dtype, model.lora_r) == (
        "meta-llama/Llama-2-7b-hf", True, "bfloat16", 8)
    assert (data.data_dir, sft.packing, sft.max_length, sft.learning_rate, sft.max_steps, sft.optim) == (
        "data/finetune", True, 1024, 1e-4, 500, "paged_adamw_32bit")
    data, dpo, model = llama2_dpo.parse_args(["--loss_type", "dpop", "--bf16", "false"])
    assert model.model_name_or_path == f"{sft.output_dir}/merged"
    assert (data.max_prompt_tokens, dpo.max_length, dpo.beta, dpo.learning_rate, dpo.max_steps) == (
        512, 1024, 0.1, 5e-4, 1000)
    assert dpo.loss_type == ["dpop"] and model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert dpo.prefix_sharing  # each pair's prompt runs once: the same numbers, fewer FLOPs


def test_streamed_sft_texts_are_shuffled_and_the_evaluation_split_capped(tmp_path):
    """SFT: the streamed training texts come in a seeded buffer-shuffled order, every one of them; DPO: the leading
    `eval_samples` pairs of the evaluation split (the reference's 1,000 by default)."""
    import llama2_dpo
    import llama2_sft

    data, sft, _ = llama2_sft.parse_args(["--dataset_name", stack_exchange.SAMPLE, "--bf16", "false",
                                          "--eval_strategy", "steps", "--eval_size", "4", "--shuffle_buffer", "100",
                                          "--seed", "1"])
    train, held_out = llama2_sft.sft_splits(data, sft)
    in_file = [llama2_sft.stack_exchange.sft_text(row)["text"] for row in sample_rows("finetune")]
    shuffled = [row["text"] for row in train]
    assert [row["text"] for row in held_out] == in_file[:4]
    assert sorted(shuffled) == sorted(in_file[4:]) and shuffled != in_file[4:]
    assert shuffled == [row["text"] for row in llama2_sft.sft_splits(data, sft)[0]]  # seeded

    data, dpo, _ = llama2_dpo.parse_args(["--dataset_name", stack_exchange.SAMPLE, "--bf16", "false",
                                          "--eval_samples", "5"])
    assert llama2_dpo.parse_args(["--bf16", "false"])[0].eval_samples == 1000
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path / "model", in_file))
    pairs = llama2_dpo.load_pairs(data, data.eval_data_dir, tokenizer, None, data.eval_samples)
    assert pairs["chosen"] == [" " + row["response_j"] for row in sample_rows("evaluation")[:5]]
    with pytest.raises(ValueError, match=r"`eval_samples` must be >= 0 \(0: the whole split\), got -1"):
        llama2_dpo.parse_args(["--eval_samples", "-1", "--bf16", "false"])
    with pytest.raises(ValueError, match=r"`shuffle_buffer` must be >= 1 \(1: the stream's own order\), got 0"):
        llama2_sft.parse_args(["--shuffle_buffer", "0", "--bf16", "false"])


@pytest.mark.parametrize("loss_type", ["cdpo", "rdpo", "beta_dpo", "npo", "tdpo1", "tdpo2"])
def test_llama2_dpo_takes_every_trl_ext_loss(loss_type):
    import llama2_dpo

    _, dpo, _ = llama2_dpo.parse_args(["--loss_type", loss_type, "--sdpo_stages", "2", "--bf16", "false"])
    assert dpo.loss_type == [loss_type] and dpo.sdpo_stages == 2


def launch(script: str, args: list[str], processes: int = 1) -> str:
    """Runs a recipe through `accelerate launch` on CPU, as a user would; returns its standard output."""
    if processes > 1:
        launcher = multi_cpu_launcher(processes)
    else:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(ROOT / "recipes" / script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def logged_steps(checkpoint: Path) -> list[dict]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry for entry in state["log_history"] if "loss" in entry]


CPU_FLAGS = ["--dataset_name", stack_exchange.SAMPLE, "--bf16", "false", "--dtype", "float32", "--optim", "adamw_torch",
             "--warmup_steps", "0", "--logging_steps", "1", "--report_to", "none", "--seed", "0"]


def _run_llama2_dpo(model_dir: str, output_dir: Path, processes: int, batch_size: int) -> list[dict]:
    launch("llama2_dpo.py", [
        *CPU_FLAGS, "--model_name_or_path", model_dir, "--load_in_4bit", "false", "--lora_target_modules", "q_proj",
        "v_proj", "--loss_type", "dpop", "--learning_rate", "5e-3", "--max_steps", "3", "--max_length", "128",
        "--per_device_train_batch_size", str(batch_size), "--gradient_accumulation_steps", "1",
        "--eval_strategy", "no", "--save_steps", "3", "--output_dir", str(output_dir),
    ], processes)
    return logged_steps(output_dir / "checkpoint-3")


@pytest.mark.e2e
def test_llama2_dpo_two_processes_match_one(se_model_dir, tmp_path):
    """2 ranks x 4 pairs see the same global batch as 1 rank x 8: the same metrics, averaged across ranks. All 24 pairs
    of the sample's `rl` split fit 128 tokens: 3 full global batches, no epoch-end padding."""
    parallel = _run_llama2_dpo(se_model_dir, tmp_path / "ddp", processes=2, batch_size=4)
    single = _run_llama2_dpo(se_model_dir, tmp_path / "single", processes=1, batch_size=8)
    assert len(parallel) == len(single) == 3
    for parallel_entry, single_entry in zip(parallel, single):
        assert parallel_entry["num_tokens"] == single_entry["num_tokens"]  # both ranks stepped
        assert parallel_entry["rewards/margins"] != 0 or parallel_entry["step"] == 1
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "dpop/active"):
            assert parallel_entry[key] == pytest.approx(single_entry[key], rel=1e-3, abs=1e-5), key
        # lambda (50) x a log-ratio that is a difference of float32 sums near -370: 1e-3 absolute
        assert parallel_entry["dpop/penalty"] == pytest.approx(single_entry["dpop/penalty"], abs=1e-3)
    assert parallel[-1]["dpop/penalty"] > 0  # the penalty was on and compared


def _run_llama2_sft(model_dir: str, output_dir: Path, processes: int, batch_size: int, loss_type: str) -> list[dict]:
    launch("llama2_sft.py", [
        *CPU_FLAGS, "--model_name_or_path", model_dir, "--load_in_4bit", "false", "--lora_target_modules", "q_proj",
        "v_proj", "--loss_type", loss_type, "--kl_coef", "1.0", "--streaming", "false", "--merge", "false",
        "--learning_rate", "5e-3", "--max_steps", "3", "--max_length", "128",
        "--per_device_train_batch_size", str(batch_size), "--gradient_accumulation_steps", "1",
        "--save_steps", "3", "--output_dir", str(output_dir),
    ], processes)
    return logged_steps(output_dir / "checkpoint-3")


@pytest.mark.e2e
@pytest.mark.parametrize("loss_type", ["kl_sft", "ift"])
def test_llama2_sft_two_processes_match_one(se_model_dir, tmp_path, loss_type):
    """2 ranks x 2 packed rows against 1 rank x 4: the same loss and metrics, averaged over the global batch. (The
    gradient norm differs a little even for TRL's own `nll` here, so it is not compared.)"""
    parallel = _run_llama2_sft(se_model_dir, tmp_path / "ddp", processes=2, batch_size=2, loss_type=loss_type)
    single = _run_llama2_sft(se_model_dir, tmp_path / "single", processes=1, batch_size=4, loss_type=loss_type)
    assert len(parallel) == len(single) == 3
    # kl/penalty is ~1e-5 after two small steps, below the drift between the runs; the log-probs it compares are not
    metric = "logps/policy" if loss_type == "kl_sft" else "ift/nll_mixed"
    for parallel_entry, single_entry in zip(parallel, single):
        assert parallel_entry["num_tokens"] == single_entry["num_tokens"]  # the same global batch
        for key in ("loss", metric):
            assert parallel_entry[key] == pytest.approx(single_entry[key], rel=2e-4), key
    assert parallel[-1]["kl/penalty" if loss_type == "kl_sft" else "ift/nll_mixed"] > 0


@pytest.mark.slow
@pytest.mark.e2e
def test_qlora_pipeline_on_embedded_model(tmp_path):
    """SFT with 4-bit NF4 + LoRA, merge, then DPOP with QLoRA on the merged model, each launched with accelerate."""
    sft_dir = tmp_path / "sft"
    output = launch("llama2_sft.py", [
        *CPU_FLAGS, "--model_name_or_path", "embedded:smollm2-135m-instruct", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "256",
        "--learning_rate", "5e-3", "--output_dir", str(sft_dir),
    ])
    assert "base in 4-bit nf4 (float32 compute)" in output  # the QLoRA path, from the config's load_in_4bit
    adapter_config = json.loads((sft_dir / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    merged = AutoModelForCausalLM.from_pretrained(sft_dir / "merged")
    assert not hasattr(merged.config, "quantization_config") and merged.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(sft_dir / "merged")
    prompt = tokenizer("Question: How do I reverse a list in Python?\n\nAnswer:", return_tensors="pt")
    # The merged weights compute what base + adapter compute (up to their rounding to bf16), and the adapter learned
    # something: compared in float32
    with torch.no_grad():
        merged_logits = merged.float()(**prompt).logits
        adapted = AutoPeftModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
        adapted_logits = adapted(**prompt).logits
        with adapted.disable_adapter():
            base_logits = adapted(**prompt).logits
    merge_error = (merged_logits - adapted_logits).abs().mean()
    adapter_effect = (adapted_logits - base_logits).abs().mean()
    assert merge_error < 0.2 * adapter_effect
    output = merged.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokenizer.decode(output[0, prompt["input_ids"].shape[1]:]).strip()

    dpo_dir = tmp_path / "dpo"
    output = launch("llama2_dpo.py", [
        *CPU_FLAGS, "--model_name_or_path", str(sft_dir / "merged"), "--loss_type", "dpop", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--eval_steps", "3",
        "--save_steps", "3", "--output_dir", str(dpo_dir),
    ])
    assert "base in 4-bit nf4" in output and "dpop/penalty" in output  # QLoRA again; the reward summary
    steps = logged_steps(dpo_dir / "checkpoint-3")
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # a fresh adapter: the policy is the reference
    assert {"rewards/chosen", "rewards/margins", "rewards/accuracies", "dpop/penalty", "logps/chosen"} <= set(steps[-1])
    evaluations = [entry for entry in json.loads((dpo_dir / "checkpoint-3" / "trainer_state.json").read_text())[
        "log_history"] if "eval_loss" in entry]
    assert len(evaluations) == 1 and "eval_rewards/margins" in evaluations[0]
