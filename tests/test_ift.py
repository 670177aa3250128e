"""IFT's first pass (`trl_ext.trainers.ift_inputs.predict_next_embeddings`) against a naive full-logits version."""

import pytest
import torch
from peft import get_peft_model
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from trl_ext.trainers import ift_inputs as ift

from .conftest import LORA


def naive_predictions(model, input_ids, attention_mask, mix_mask, prediction):
    """Position by position from the model's own full `(B, T, vocab)` logits and its embedding layer's output for
    every token: what the chunked first pass must reproduce."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    embedding = model.get_input_embeddings()
    every_token = embedding(torch.arange(embedding.num_embeddings))
    predicted = torch.zeros(*input_ids.shape, embedding.embedding_dim)
    nll = torch.zeros(input_ids.shape)
    for b, t in mix_mask.nonzero().tolist():
        probs = logits[b, t - 1].softmax(-1)  # position t is predicted from position t - 1
        predicted[b, t] = every_token[probs.argmax()] if prediction == "greedy" else probs @ every_token
        nll[b, t] = -probs[input_ids[b, t]].log()
    return predicted, nll


TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def tiny_model(kind: str):
    """Gemma 2: scaled input embeddings (by the square root of the hidden size) and soft-capped logits; Granite:
    logits divided by `logits_scaling`; Cohere: logits multiplied by `logit_scale`."""
    torch.manual_seed(0)
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=2.0))
    if kind == "granite":
        return GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=4.0))
    return CohereForCausalLM(CohereConfig(**TINY, logit_scale=3.0))


@pytest.mark.parametrize("model_kind", ["llama", "llama_peft", "gemma2", "granite", "cohere"])
@pytest.mark.parametrize("prediction", ["greedy", "soft"])
def test_first_pass_matches_full_logits_position_by_position(tiny_model_dir, monkeypatch, prediction, model_kind):
    monkeypatch.setattr(ift, "PREDICTION_CHUNK", 5)  # several chunks, the last one partial
    torch.manual_seed(0)
    model = (AutoModelForCausalLM.from_pretrained(tiny_model_dir) if model_kind.startswith("llama")
             else tiny_model(model_kind)).eval()
    peft = model_kind == "llama_peft"
    if peft:
        model = get_peft_model(model, LORA)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.05)
    input_ids = torch.randint(1, model.config.vocab_size, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0  # right padding
    mix_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mix_mask[0, 3:] = True  # prompt of 3 tokens; its first completion token is mixed too
    mix_mask[1, 1:] = True
    mix_mask[2, 4:6] = True
    assert mix_mask.sum() > 2 * ift.PREDICTION_CHUNK

    with torch.no_grad():
        predicted, nll = ift.predict_next_embeddings(model, {"input_ids": input_ids, "attention_mask": attention_mask},
                                                     mix_mask, prediction)
        expected_predicted, expected_nll = naive_predictions(model, input_ids, attention_mask, mix_mask, prediction)
    torch.testing.assert_close(predicted, expected_predicted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nll, expected_nll, rtol=1e-5, atol=1e-5)
    assert (predicted[~mix_mask] == 0).all() and (nll[~mix_mask] == 0).all()
    assert (nll[mix_mask] > 0).all()
