"""The Penn experiment recipe end to end with `--quick`, and its optional judge against a local server."""

import http.server
import importlib.util
import json
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("penn_experiment", ROOT / "recipes" / "penn_experiment.py")
penn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(penn)

OUTPUT_FILES = ["report.md", "results.json", "alignment_accuracy.png", "loss_curves.png", "rewards_dpo.png",
                "rewards_dpop.png", "rewards_trl_dpo.png", "objective_metrics.png"]


def parse(args: list[str]) -> "penn.PennArguments":
    """What `python recipes/penn_experiment.py ARGS` passes to `main`."""
    (penn_args,) = penn.parse_args(args)
    return penn_args


def check_outputs(output_dir: Path, methods) -> dict:
    for name in OUTPUT_FILES:
        assert (output_dir / name).stat().st_size > 0, name
    results = json.loads((output_dir / "results.json").read_text())
    assert list(results["metrics"]) == list(methods)
    for method, metrics in results["metrics"].items():
        for key in penn.METRICS:
            assert isinstance(metrics[key], float), (method, key)
        assert 0 <= metrics["alignment_accuracy"] <= 1
        assert (metrics["final_chosen_reward"] is None) == (method not in penn.DPO_FAMILY)
        if method != "base":
            assert any((output_dir / method / "model").glob("adapter_model.safetensors"))
    assert {"torch", "trl", "transformers", "trl_ext"} <= set(results["versions"])
    table = (output_dir / "report.md").read_text()
    assert all(f"| {method} |" in table for method in methods)
    return results


@pytest.mark.e2e
def test_quick_run_on_tiny_model_then_resume(tiny_model_dir, tmp_path):
    args = ["--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
            "--lora_target_modules", "q_proj", "v_proj"]
    results = penn.main(parse(args))
    check_outputs(tmp_path, penn.DEFAULT_METHODS)
    # A rerun skips every finished method; --overwrite redoes the one asked for
    stamps = {method: (tmp_path / method / "result.json").stat().st_mtime_ns for method in penn.DEFAULT_METHODS}
    penn.main(parse(args))
    assert {method: (tmp_path / method / "result.json").stat().st_mtime_ns for method in stamps} == stamps
    again = penn.main(parse([*args, "--methods", "sft", "--overwrite"]))
    assert (tmp_path / "sft" / "result.json").stat().st_mtime_ns != stamps["sft"]
    # The redone method is deterministic: the same seed trains the same adapter, which samples the same text. (Its
    # alignment accuracy would compare two zeros on this model; its completions are stored in results.json.)
    completions = results["methods"]["sft"]["completions"]
    assert len(completions) == 16 and any(completion.strip() for completion in completions)  # --quick: 16 prompts
    assert again["methods"]["sft"]["completions"] == completions
    stored = json.loads((tmp_path / "results.json").read_text())["methods"]["sft"]["completions"]
    assert stored == completions


class _JudgeHandler(http.server.BaseHTTPRequestHandler):
    """Speaks the chat-completions protocol; prefers whichever completion mentions Penn."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and self.headers["Authorization"] == "Bearer secret"
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


def test_judge_against_local_openai_compatible_server(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret")
    args = parse(["--judge_base_url", f"http://127.0.0.1:{server.server_port}/v1", "--judge_api_key_env",
                  "TEST_JUDGE_KEY", "--seed", "3"])
    prompts = ["p1", "p2", "p3", "p4"]
    penn_side = ["at Penn.", "near Penn.", "the river.", "UPenn."]  # mentions Penn 3 times of 4
    other_side = ["the park.", "the river.", "at Penn.", "the lake."]
    try:
        rate = penn.judge_pair(args, prompts, penn_side, other_side)
    finally:
        server.shutdown()
    # p1, p2, p4: A mentions Penn, B does not -> A wins; p3: B mentions Penn -> B wins
    assert rate == pytest.approx(3 / 4)


@pytest.mark.e2e
def test_quick_run_of_the_other_dpo_losses(tiny_model_dir, tmp_path):
    penn.main(parse(["--quick", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
                     "--lora_target_modules", "q_proj", "v_proj", "--methods", *penn.MORE_DPO_METHODS]))
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    assert list(metrics) == list(penn.MORE_DPO_METHODS)
    for method in penn.MORE_DPO_METHODS:
        assert isinstance(metrics[method]["final_chosen_reward"], float), method
        assert (tmp_path / f"rewards_{method}.png").stat().st_size > 0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"Unknown `methods` \['rlhf'\]"):
        parse(["--methods", "sft", "rlhf"])


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_run_on_embedded_model(tmp_path):
    penn.main(parse(["--quick", "--output_dir", str(tmp_path)]))
    check_outputs(tmp_path, penn.DEFAULT_METHODS)
