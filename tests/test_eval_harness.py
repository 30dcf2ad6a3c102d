"""The lm-eval backend: on SmolLM2's HF export and small local tasks, our `lmforge` model type scores
what lm-eval's own `hf` backend scores (log-likelihoods within 1e-4, greedy generations exactly).
Slow: exports SmolLM2 once (about a minute) and runs both backends on a handful of questions."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

MC = [("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
      ("Two plus two equals", ["three", "four", "five"], 1),
      ("The opposite of hot is", ["cold", "warm", "spicy"], 0),
      ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin"], 0)]
GEN = [("What is 3 + 4?", "7"), ("Name the largest planet in the solar system.", "Jupiter"),
       ("Write the word hello in capital letters.", "HELLO")]
TEXTS = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
         "All the world's a stage, and all the men and women merely players."]


def _task(directory, name, rows, body):
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n" + body)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    _task(directory, "lmf_mc", [{"question": q, "choices": c, "label": a} for q, c, a in MC],
          'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
          "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    _task(directory, "lmf_gen", [{"question": q, "answer": a} for q, a in GEN],
          'output_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: answer\n'
          'generation_kwargs:\n  until: ["\\n\\n", "Question:"]\n  max_gen_toks: 24\n  do_sample: false\n'
          "metric_list:\n  - metric: exact_match\n")
    _task(directory, "lmf_ppl", [{"text": t} for t in TEXTS],
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
          "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from lmforge.model.loading import export, load

    directory = tmp_path_factory.mktemp("smollm2-hf")
    model, tokenizer = load("smollm2-135m-instruct")
    export(model, tokenizer, directory, "hf")
    return directory


def _evaluate(model, model_args, task_dir):
    import lm_eval
    import lm_eval.tasks

    import lmforge.eval.harness  # noqa: F401

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["lmf_mc", "lmf_gen", "lmf_ppl"],
                                   task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir)),
                                   batch_size=4, device="cpu", log_samples=True)


def test_lmforge_backend_matches_lm_eval_hf_backend(hf_dir, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ours = _evaluate("lmforge", f"model={hf_dir},max_length=2048", task_dir)
    theirs = _evaluate("hf", f"pretrained={hf_dir},dtype=float32,max_length=2048", task_dir)
    for ours_sample, their_sample in zip(ours["samples"]["lmf_mc"], theirs["samples"]["lmf_mc"], strict=True):
        for (a, greedy_a), (b, greedy_b) in zip([r[0] for r in ours_sample["resps"]],
                                                 [r[0] for r in their_sample["resps"]], strict=True):
            assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    generated = [s["resps"][0][0] for s in ours["samples"]["lmf_gen"]]
    assert generated == [s["resps"][0][0] for s in theirs["samples"]["lmf_gen"]]
    assert any(text.strip() for text in generated)
    for a, b in zip(ours["samples"]["lmf_ppl"], theirs["samples"]["lmf_ppl"], strict=True):
        assert a["resps"][0][0] == pytest.approx(b["resps"][0][0], abs=1e-4)
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                # Perplexities are exp(-mean log-likelihood): log-likelihoods equal to 1e-6 still
                # move a perplexity of 304 by ~1e-3, so those compare relatively.
                tolerance = {"rel": 1e-5} if "perplexity" in key else {"abs": 1e-4}
                assert ours["results"][task][key] == pytest.approx(value, **tolerance), (task, key)


def test_lmforge_eval_harness_command(hf_dir, task_dir, tmp_path, monkeypatch, capsys):
    from lmforge.cli import main
    from lmforge.eval.results import load_results

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(hf_dir), "--harness", "lmf_mc", "--include-path", str(task_dir),
                 "--out", str(out)]) == 0
    result = load_results(out).tasks["lmf_mc"]
    assert result.n == len(MC) and set(result.metrics) == {"acc", "acc_norm"}
    assert main(["eval", "--model", str(hf_dir), "--harness", "no_such_task", "--include-path", str(task_dir)]) == 2
    assert "lm-eval knows no task no_such_task" in capsys.readouterr().err
