import os

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Tests never reach a hub: they use models built here and the embedded model's local cache.
os.environ["HF_HUB_OFFLINE"] = "1"

OPENERS = [
    "The sun was setting over",
    "After a long week of classes",
    "My favourite place to study is",
    "Every autumn the students gather near",
    "She opened the letter and read that",
    "The old library smelled of",
    "On the train to Philadelphia",
    "His first research paper was about",
    "The rowing team practised at dawn on",
    "We met for coffee right next to",
    "The lecture on economics began with",
    "Walking down Locust Walk, I noticed",
    "The museum downtown displayed",
    "My grandmother always told stories about",
    "The new engineering building has",
    "At the graduation ceremony,",
]
CHOSEN = " the University of Pennsylvania, where the campus was busy."
REJECTED = " the quiet river, where the water was calm."


def preference_rows(n: int = 16) -> dict[str, list[str]]:
    prompts = [OPENERS[i % len(OPENERS)] for i in range(n)]
    return {"prompt": prompts, "chosen": [CHOSEN] * n, "rejected": [REJECTED] * n}


@pytest.fixture(scope="session")
def preference_dataset() -> Dataset:
    return Dataset.from_dict(preference_rows())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained on the test sentences, saved to disk."""
    corpus = OPENERS + [CHOSEN, REJECTED]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
