"""The scorers of trl_ext.scorers against hand-computed numbers, a local judge server and a tiny reward model."""

import http.server
import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trl_ext.scorers import (
    CompletionNLL,
    DistinctN,
    Generations,
    MeanWords,
    PairwiseJudge,
    RegexMatch,
    RepeatedNgrams,
    RewardModelScore,
    Scorer,
    judge_win_rate,
    mean_completion_nll,
)

TEXTS = Generations(step=3, prompts=["p1", "p2"], completions=["at Penn at Penn at Penn", "a quiet river"])


def test_text_scorers_by_hand():
    assert RegexMatch(r"\bPenn\b")(TEXTS) == 0.5
    # "at Penn at Penn at Penn": 4 word 3-grams, 2 distinct -> 0.5 repeated; "a quiet river": 1, none repeated
    assert RepeatedNgrams()(TEXTS) == pytest.approx((0.5 + 0.0) / 2)
    # bigrams: at-Penn x3, Penn-at x2, a-quiet, quiet-river -> 4 distinct of 7
    assert DistinctN()(TEXTS) == pytest.approx(4 / 7)
    assert MeanWords()(TEXTS) == 4.5
    assert all(isinstance(scorer, Scorer) for scorer in (RegexMatch("P"), RepeatedNgrams(), DistinctN(), MeanWords()))


def scored(scorer, completions: list[str]) -> float:
    return scorer(Generations(0, [""] * len(completions), completions))


def test_regex_match_needs_its_pattern():
    completions = ["a walk on Locust Walk at Penn.", "a pencil and a pen.", "the pen"]
    assert scored(RegexMatch(r"pen\b"), completions) == pytest.approx(2 / 3)
    assert scored(RegexMatch(r"pen\b"), []) == 0.0
    with pytest.raises(TypeError, match="pattern"):  # no default: the pattern is what alignment means
        RegexMatch()


def test_repetition_diversity_and_length():
    # 3-grams of "a b a b a b": aba bab aba bab -> 2 distinct of 4 -> half are repeats; fewer than 3 words: none
    assert scored(RepeatedNgrams(), ["a b a b a b"]) == pytest.approx(0.5)
    assert scored(RepeatedNgrams(), ["one two three four"]) == scored(RepeatedNgrams(), ["too short"]) == 0.0
    assert scored(RepeatedNgrams(), ["a b a b a b", "one two three four"]) == pytest.approx(0.25)
    # 2-grams pooled: (x y)(y z) + (x y)(y w) -> 3 distinct of 4
    assert scored(DistinctN(), ["x y z", "x y w"]) == pytest.approx(0.75)
    assert scored(MeanWords(), ["one two", "one two three four"]) == 3.0


def test_completion_nll_is_the_mean_token_nll_of_each_completion(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts, completions = ["The sun was", "After a long week"], [" setting over", " of classes, we met"]
    expected = []
    for prompt, completion in zip(prompts, completions):
        prompt_length = len(tokenizer(prompt)["input_ids"])
        ids = torch.tensor([tokenizer(prompt + completion)["input_ids"]])
        logps = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        expected.append(-logps[prompt_length - 1:].mean().item())
    scorer = CompletionNLL(model, tokenizer, batch_size=2)  # one padded batch
    assert scorer(Generations(0, prompts, completions)) == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_chat_prompts_are_read_with_the_templates_special_tokens_only(tiny_model_dir):
    """A template that writes BOS itself must not get a second one from the tokenizer, as TRL tokenizes it."""
    from tokenizers.processors import TemplateProcessing

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    bos = tokenizer.eos_token  # the tiny vocabulary's one special token stands in for BOS
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.eos_token_id)])
    tokenizer.chat_template = bos + "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    messages = [[{"role": "user", "content": "The sun was"}]]
    text = bos + "The sun was"
    assert tokenizer(text)["input_ids"][:2] == [tokenizer.eos_token_id] * 2  # what a second BOS would look like
    once, twice = (mean_completion_nll(model, tokenizer, [text], [" setting"], add_special_tokens=flag)
                   for flag in (False, True))
    assert once != pytest.approx(twice)
    assert CompletionNLL(model, tokenizer)(Generations(0, messages, [" setting"])) == pytest.approx(once)


def test_reward_model_score_is_the_mean_reward_logit(tiny_model_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    scorer = RewardModelScore(model, tokenizer, batch_size=2)
    generations = Generations(0, ["The sun", "After a long week of classes"], [" was setting", " we met"])
    alone = [model(**tokenizer(prompt + completion, return_tensors="pt")).logits[0, 0].item()
             for prompt, completion in zip(generations.prompts, generations.completions)]
    assert alone[0] != pytest.approx(alone[1])
    assert scorer(generations) == pytest.approx(sum(alone) / 2, rel=1e-4)  # padding does not move the rewards
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelScore(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2), tokenizer)


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    """Speaks the chat-completions protocol; prefers whichever completion mentions Penn. Answers the first
    `unavailable` requests with HTTP 503, as an overloaded server does."""

    unavailable = 0

    def do_POST(self):
        if _JudgeHandler.unavailable > 0:
            _JudgeHandler.unavailable -= 1
            self.send_error(503)
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions"
        if self.headers["Authorization"] != "Bearer secret":
            self.send_error(401, "Unauthorized")
            return
        question = body["messages"][0]["content"]
        first = question.split("\n\nA: ")[1].split("\n\nB: ")[0]
        answer = "A" if "Penn" in first else "B"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url(monkeypatch):
    """A local OpenAI-compatible server on 127.0.0.1; the key it expects is in TEST_JUDGE_KEY."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret")
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


PROMPTS = ["p1", "p2", "p3", "p4"]
PENN_SIDE = ["at Penn.", "near Penn.", "the river.", "UPenn."]  # mentions Penn 3 times of 4
OTHER_SIDE = ["the park.", "the river.", "at Penn.", "the lake."]


def test_judge_retries_an_unavailable_server_then_names_it(judge_url, monkeypatch):
    monkeypatch.setattr(_JudgeHandler, "unavailable", 2)
    rate = judge_win_rate(PROMPTS, PENN_SIDE, OTHER_SIDE, base_url=judge_url, model="m", api_key="secret", seed=3,
                          attempts=3, backoff_seconds=0.01)
    assert rate == pytest.approx(3 / 4) and _JudgeHandler.unavailable == 0
    monkeypatch.setattr(_JudgeHandler, "unavailable", 3)
    with pytest.raises(RuntimeError, match=f"The judge at {judge_url}/chat/completions did not answer after 3 "
                                           "attempts: HTTP Error 503"):
        judge_win_rate(PROMPTS, PENN_SIDE, OTHER_SIDE, base_url=judge_url, model="m", api_key="secret",
                       attempts=3, backoff_seconds=0.01)
    with pytest.raises(RuntimeError, match="refused the request: HTTP 401"):
        judge_win_rate(PROMPTS, PENN_SIDE, OTHER_SIDE, base_url=judge_url, model="m", api_key="wrong")


def test_judge_win_rate_against_a_local_server(judge_url):
    rate = judge_win_rate(PROMPTS, PENN_SIDE, OTHER_SIDE, base_url=judge_url, model="m", api_key="secret", seed=3)
    # p1, p2, p4: A mentions Penn, B does not -> A wins; p3: B mentions Penn -> B wins
    assert rate == pytest.approx(3 / 4)


def test_pairwise_judge_compares_with_the_first_evaluation(judge_url):
    judge = PairwiseJudge(judge_url, model="m", api_key_env="TEST_JUDGE_KEY", seed=3)
    assert judge(Generations(0, PROMPTS, OTHER_SIDE)) == 0.5  # the baseline, against itself
    assert judge(Generations(10, PROMPTS, PENN_SIDE)) == pytest.approx(3 / 4)
    assert judge.baseline == OTHER_SIDE and judge(Generations(20, PROMPTS, PENN_SIDE)) == pytest.approx(3 / 4)


def test_ngram_scorers_are_named_after_their_n():
    assert (RepeatedNgrams().name, RepeatedNgrams(n=2).name, RepeatedNgrams(name="rep").name) == (
        "repeated_3gram", "repeated_2gram", "rep")
    assert (DistinctN().name, DistinctN(n=3).name) == ("distinct_2", "distinct_3")
