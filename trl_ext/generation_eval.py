"""Generate from a fixed prompt set while training and log scores of the completions.

`GenerationEvalCallback` works with any `transformers.Trainer` (trl_ext's, TRL's), PEFT models included, on one
process or many: under DDP each process generates its share of the prompts and the completions are gathered.
Generation is batched, left-padded and seeded per batch of prompts, and runs in a forked RNG, so the completions do
not depend on the number of processes and the training run does not depend on the callback.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .scorers import Generations, Scorer, adds_special_tokens, prompt_texts
from .trl_contract import log_sample_table, log_without_flushing_metrics, unwrap_model_for_generation

SAMPLES_KEY = "eval_gen/samples"


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence, *, max_new_tokens: int = 32, batch_size: int = 8,
                         seed: int = 0, generation_kwargs: dict | None = None, process_index: int = 0,
                         num_processes: int = 1, disable_tqdm: bool = False) -> list[tuple[int, list[str]]]:
    """Completions of this process's batches of `prompts` (batch `b` is `prompts[b * batch_size:][:batch_size]`,
    process `p` takes the batches with `b % num_processes == p`), as `(b, completions)` pairs. Each batch is
    generated with the RNG seeded `seed + b`, so a prompt's completion is the same whichever process generates it."""
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    texts = prompt_texts(prompts, tokenizer)
    batches = range(0, len(texts), batch_size)
    mine = [index for index in range(len(batches)) if index % num_processes == process_index]
    results = []
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            for index in tqdm(mine, desc="generating", disable=disable_tqdm):
                torch.manual_seed(seed + index)
                batch = tokenizer(texts[batches[index]: batches[index] + batch_size], return_tensors="pt",
                                  padding=True, add_special_tokens=adds_special_tokens(prompts)).to(device)
                output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                                        **(generation_kwargs or {}))
                results.append((index, tokenizer.batch_decode(output[:, batch["input_ids"].size(1):],
                                                              skip_special_tokens=True)))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results


def in_prompt_order(batches: list[tuple[int, list[str]]]) -> list[str]:
    """The completions of `(batch index, completions)` pairs gathered from every process, in prompt order."""
    return [completion for _, completions in sorted(batches) for completion in completions]


class GenerationEvalCallback(TrainerCallback):
    """Every `eval_every` optimizer steps, at the start (step 0) and at the end of training, generates a completion for
    each of `prompts` (text, or chat messages), scores them with `scorers` and logs `eval_gen/<scorer name>` through
    the trainer's log: every `report_to` tracker, the console and `state.log_history` get it. Also appends every
    completion with its step to `<output_dir>/eval_generations.jsonl` and logs the first `num_samples` as a table to
    W&B and trackio, as text to TensorBoard.

    `generation_kwargs` go to `model.generate` (e.g. `{"do_sample": True, "temperature": 0.7}`); sampling is seeded
    by `seed` (default: the trainer's `args.seed`). `completions_file` (default `<output_dir>/eval_generations.jsonl`)
    receives a `{"step", "prompt", "completion"}` line per completion.

        scorers = [RegexMatch(r"\bPenn\b"), RepeatedNgrams()]
        trainer.add_callback(GenerationEvalCallback(trainer, prompts, scorers, eval_every=50))
    """

    def __init__(self, trainer: transformers.Trainer, prompts: Sequence, scorers: Sequence[Scorer], *,
                 eval_every: int = 100, max_new_tokens: int = 32, batch_size: int = 8,
                 generation_kwargs: dict | None = None, seed: int | None = None, num_samples: int = 8,
                 at_start: bool = True, completions_file: str | None = None):
        if not prompts:
            raise ValueError("GenerationEvalCallback needs at least one prompt in `prompts`.")
        if eval_every < 1:
            raise ValueError(f"`eval_every` must be a number of steps >= 1, got {eval_every}.")
        names = [getattr(scorer, "name", None) for scorer in scorers]
        bad = [scorer for scorer in scorers if not isinstance(scorer, Scorer)]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"`scorers` must be callables with distinct `name`s (see trl_ext.scorers.Scorer); got "
                             f"names {names}.")
        if trainer.is_fsdp_enabled:
            raise ValueError("GenerationEvalCallback cannot generate from FSDP's sharded parameters; use DDP or "
                             "DeepSpeed (ZeRO-3 parameters are gathered), or evaluate after training.")
        self.trainer, self.prompts, self.scorers = trainer, list(prompts), list(scorers)
        self.eval_every, self.max_new_tokens, self.batch_size = eval_every, max_new_tokens, batch_size
        self.generation_kwargs, self.num_samples, self.at_start = generation_kwargs, num_samples, at_start
        self.seed = trainer.args.seed if seed is None else seed
        self.jsonl_path = Path(completions_file or Path(trainer.args.output_dir) / "eval_generations.jsonl")
        self._last_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start:
            self.evaluate()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_every == 0:
            self.evaluate()

    def on_train_end(self, args, state, control, **kwargs):
        self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Generates, scores and logs at the current step (once per step); returns the logged scores."""
        trainer, state = self.trainer, self.trainer.state
        if self._last_step == state.global_step:
            return {}
        self._last_step = state.global_step
        accelerator = trainer.accelerator
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        with unwrap_model_for_generation(trainer.model_wrapped, accelerator,
                                         gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs
                                         ) as model:
            batches = generate_completions(
                model, tokenizer, self.prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                seed=self.seed, generation_kwargs=self.generation_kwargs, process_index=accelerator.process_index,
                num_processes=accelerator.num_processes,
                disable_tqdm=trainer.args.disable_tqdm or not accelerator.is_local_main_process,
            )
        if accelerator.num_processes > 1:
            batches = gather_object(batches)
        generations = Generations(state.global_step, self.prompts, in_prompt_order(batches))
        # Scored once, on the main process (a judge or reward model is not asked once per process), then shared so
        # every process logs the same numbers.
        scores = [{f"eval_gen/{scorer.name}": float(scorer(generations)) for scorer in self.scorers}
                  if accelerator.is_main_process else None]
        scores = broadcast_object_list(scores)[0] if accelerator.num_processes > 1 else scores[0]
        if accelerator.is_main_process:
            self._write_jsonl(generations)
            self._log_samples(generations)
        log_without_flushing_metrics(trainer, dict(scores))
        return scores

    def _write_jsonl(self, generations: Generations) -> None:
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        with self.jsonl_path.open("a") as file:
            for prompt, completion in zip(generations.prompts, generations.completions):
                file.write(json.dumps({"step": generations.step, "prompt": prompt, "completion": completion}) + "\n")

    def _log_samples(self, generations: Generations) -> None:
        """The first `num_samples` prompts and completions, to the trackers that show tables or text."""
        rows = [[generations.step, str(prompt), completion] for prompt, completion in
                list(zip(generations.prompts, generations.completions))[: self.num_samples]]
        log_sample_table(self.trainer, SAMPLES_KEY, ["step", "prompt", "completion"], rows, generations.step)
