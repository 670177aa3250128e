"""IFT's first pass (`trl_ext.trainers.ift_inputs.predict_next_embeddings`) against a naive full-logits version."""

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from trl_ext.trainers import ift_inputs as ift

from .conftest import LORA


def naive_predictions(model, input_ids, attention_mask, mix_mask, prediction):
    """Position by position from the full `(B, T, vocab)` logits: what the chunked first pass must reproduce."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    embedding = model.get_input_embeddings().weight
    predicted = torch.zeros(*input_ids.shape, embedding.size(1))
    nll = torch.zeros(input_ids.shape)
    for b, t in mix_mask.nonzero().tolist():
        probs = logits[b, t - 1].softmax(-1)  # position t is predicted from position t - 1
        predicted[b, t] = embedding[probs.argmax()] if prediction == "greedy" else probs @ embedding
        nll[b, t] = -probs[input_ids[b, t]].log()
    return predicted, nll


@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft"])
@pytest.mark.parametrize("prediction", ["greedy", "soft"])
def test_first_pass_matches_full_logits_position_by_position(tiny_model_dir, monkeypatch, prediction, peft):
    monkeypatch.setattr(ift, "PREDICTION_CHUNK", 5)  # several chunks, the last one partial
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
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
