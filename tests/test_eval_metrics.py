"""lmforge eval: metrics by hand, rolling windows, the batched scorer against a plain forward, tasks,
bad input, and the HumanEval sandbox. Tiny models built in code; runs in seconds."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import UserError
from lmforge.eval import metrics as M
from lmforge.eval.requests import Scorer, rolling_windows

DATA = Path(__file__).parent / "data" / "eval"
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ metrics, by hand

def test_acc_sums_logprobs_and_acc_norm_divides_by_characters():
    # -1.0 over 2 chars = -0.5 per char; -2.0 over 6 chars = -0.33 per char.
    assert M.choice_scores([-1.0, -2.0], ["ab", "abcdef"]) == (0, 1)
    assert M.choice_scores([-3.0, -2.0, -9.0], ["a", "b", "c"]) == (1, 1)


def test_gsm8k_and_last_number_extraction():
    assert M.extract_gsm8k("She has 3 + 4 = 7.\n#### 1,234.") == "1234"
    assert M.extract_gsm8k("the answer is 7") is None
    assert M.extract_last_number("I had 3 apples and paid $12.50.") == "12.5"
    assert M.extract_last_number("no digits here") is None
    assert M.exact_match(M.extract_gsm8k("#### 18"), "18") == 1.0
    assert M.exact_match("18.0", "18") == 1.0
    assert M.exact_match("17", "18") == 0.0
    assert M.exact_match(None, "18") == 0.0
    assert M.exact_match(" Paris ", "Paris", numeric=False) == 1.0


def test_pass_at_k_unbiased_estimator():
    assert M.pass_at_k(5, 2, 1) == pytest.approx(0.4)                 # c / n
    assert M.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)          # 1 - C(3,2)/C(5,2)
    assert M.pass_at_k(5, 0, 3) == 0.0
    assert M.pass_at_k(5, 4, 2) == 1.0                                # n - c < k
    assert M.pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError):
        M.pass_at_k(3, 4, 1)


def test_bits_per_byte_and_bootstrap_stderr():
    rows = np.array([[math.log(2) * 10, 5.0], [math.log(2) * 2, 1.0]])   # 12 bits over 6 bytes
    assert M.bpb_statistic(rows) == pytest.approx(2.0)
    assert M.bits_per_byte(math.log(2) * 16, 8) == pytest.approx(2.0)
    assert M.bootstrap_stderr([1.0, 1.0, 1.0]) == 0.0
    assert M.bootstrap_stderr([1.0]) is None
    # A fair coin over 100 questions: stderr of the mean = sqrt(0.25 / 100) = 0.05.
    assert M.bootstrap_stderr([0.0, 1.0] * 50, iterations=4000) == pytest.approx(0.05, abs=0.005)


# ------------------------------------------------------------------ rolling windows

@pytest.mark.parametrize("length", [1, 5, 16, 17, 40, 101])
@pytest.mark.parametrize("context_len", [1, 4, 8, 16])
def test_rolling_windows_predict_every_token_exactly_once(length, context_len):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + length))
    windows = list(rolling_windows(tokens, 0, 16, context_len))
    assert [t for _, cont in windows for t in cont] == tokens
    stream = [0] + tokens
    for context, continuation in windows:
        assert len(context) + len(continuation) - 1 <= 16            # fits one forward
        start = stream.index(continuation[0])
        assert stream[start - len(context):start] == context          # the context is what precedes it
    if length > 16 + 1:
        assert min(len(c) for c, _ in windows[1:]) >= context_len - 1 + (context_len == 1)
    reference = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, 16, context_len)]
    assert windows == reference                                       # lm-eval's own windows


# ------------------------------------------------------------------ the scorer vs a plain forward

@pytest.fixture(scope="module")
def tiny_gpt():
    from lmforge.model import build_model, get_preset

    torch.manual_seed(0)
    return build_model(get_preset("tiny", vocab_size=300, max_seq_len=64)).eval()


def _plain(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).float(), -1)[0]
    target = torch.tensor(continuation)
    positions = torch.arange(len(context) - 1, len(context) - 1 + len(continuation))
    return float(logprobs[positions, target].sum()), bool((logprobs[positions].argmax(-1) == target).all())


def test_scorer_equals_a_plain_forward_with_shared_prefixes(tiny_gpt):
    generator = torch.Generator().manual_seed(1)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=generator))   # noqa: E731
    pairs = []
    for _ in range(9):   # questions with 1..4 choices of 1..12 tokens: singles, shared, one-token groups
        context = torch.randint(0, 300, (draw(1, 30),), generator=generator).tolist()
        for _ in range(draw(1, 5)):
            pairs.append((context, torch.randint(0, 300, (draw(1, 13),), generator=generator).tolist()))
    pairs += [([7, 8], [1]), ([7, 8], [2]), ([9] * 90, [1, 2])]   # one-token choices; a context to truncate
    scorer = Scorer(tiny_gpt, batch_tokens=150)                      # several batches
    got = scorer.loglikelihood(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        context = context[-(scorer.max_length + 1 - len(continuation)):]
        want_logprob, want_greedy = _plain(tiny_gpt, context, continuation)
        assert logprob == pytest.approx(want_logprob, abs=1e-4)
        assert greedy == want_greedy
    # A continuation the model would produce greedily is reported as greedy.
    context = [5, 6, 7]
    greedy_token = int(tiny_gpt(torch.tensor([context]))[0, -1].argmax())
    assert scorer.loglikelihood([(context, [greedy_token]), (context, [(greedy_token + 1) % 300])])[0][1] is True


def test_rolling_loglikelihood_is_the_sum_over_windows(tiny_gpt):
    tokens = torch.randint(1, 300, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    scorer = Scorer(tiny_gpt)
    for context_len in (1, 32):
        windows = list(rolling_windows(tokens, 0, 64, context_len))
        want = sum(_plain(tiny_gpt, c, x)[0] for c, x in windows)
        assert scorer.loglikelihood_rolling([tokens], 0, context_len)[0] == pytest.approx(want, abs=1e-3)
    short = tokens[:20]
    assert scorer.loglikelihood_rolling([short], 0)[0] == pytest.approx(_plain(tiny_gpt, [0], short)[0], abs=1e-4)


# ------------------------------------------------------------------ tasks on the tiny trained model

@pytest.fixture(scope="module")
def tiny_lm():
    from infer_support import load_tiny
    from lmforge.eval.lm import EvalModel

    model, tokenizer = load_tiny()
    return EvalModel(model, tokenizer, ref="tiny")


def test_multiple_choice_task_from_yaml(tiny_lm):
    from lmforge.eval.task_data import load_task
    from lmforge.eval.tasks import run_task

    task = load_task(str(DATA / "capitals.yaml"))
    assert [d["gold"] for d in task.docs] == [0, 1, 0, 1]              # an index or the choice's text
    result = run_task(task, tiny_lm)
    prompts = task.prompts(task.docs, 0, 1234)
    assert prompts[0] == "Q: What is the capital of France?\nA:"
    acc = []
    for prompt, doc in zip(prompts, task.docs):
        scores = [tiny_lm.loglikelihood([(prompt, " " + c)])[0][0] for c in doc["choices"]]
        acc.append(float(int(np.argmax(scores)) == doc["gold"]))
    assert result.metric == "acc" and result.n == 4
    assert result.value == pytest.approx(np.mean(acc))
    assert set(result.metrics) == {"acc", "acc_norm"}


def test_generative_task_and_fewshot_prompts(tiny_lm):
    from lmforge.eval.task_data import load_task
    from lmforge.eval.tasks import run_task

    task = load_task(str(DATA / "sums.yaml"))
    one_shot = task.prompts(task.docs, 1, 1234)
    assert one_shot[0] == "10 + 7 = 17\n\n2 + 3 ="                      # never the question itself
    result = run_task(task, tiny_lm, num_fewshot=1)
    texts = tiny_lm.generate(one_shot, until=["\n"], max_tokens=8)
    want = np.mean([M.exact_match(M.extract_last_number(t), d["reference"]) for t, d in zip(texts, task.docs)])
    assert result.value == pytest.approx(want) and result.metric == "exact_match"


def test_builtin_tasks_load():
    from lmforge.eval.task_data import load_task

    gsm = load_task("gsm8k-mini")
    assert len(gsm.docs) == 100 and gsm.docs[0]["reference"] == "18"
    assert len(load_task("gsm8k").docs) == 1319
    mmlu = load_task("mmlu-fewshot")
    assert len(mmlu.docs) >= 250 and all(0 <= d["gold"] < len(d["choices"]) for d in mmlu.docs)
    assert len(load_task("humaneval").docs) == 164
    assert load_task("shakespeare-bpb").docs


# ------------------------------------------------------------------ bad input

def _write_task(tmp_path, yaml_text, records):
    (tmp_path / "d.jsonl").write_text("\n".join(records) + "\n")
    path = tmp_path / "t.yaml"
    path.write_text(yaml_text)
    return str(path)


def test_bad_input_gets_a_clear_user_error(tmp_path):
    from lmforge.eval.lm import EvalModel
    from lmforge.eval.task_data import load_task

    with pytest.raises(UserError, match="unknown task 'nope'"):
        load_task("nope")
    missing = _write_task(tmp_path, "data: d.jsonl\ntype: multiple_choice\nprompt: '{q}'\n", ['{"q": "x"}'])
    with pytest.raises(UserError, match="needs the fields choices, answer"):
        load_task(missing)
    outside = _write_task(tmp_path, "data: d.jsonl\nprompt: '{q}'\nchoices: [yes, no]\nanswer: a\n",
                          ['{"q": "x", "a": "maybe"}'])
    with pytest.raises(UserError, match="not one of the choices"):
        load_task(outside)
    index = _write_task(tmp_path, "data: d.jsonl\nprompt: '{q}'\nchoices: [yes, no]\nanswer: a\n", ['{"q": "x", "a": 5}'])
    with pytest.raises(UserError, match="outside the 2 choices"):
        load_task(index)
    field = _write_task(tmp_path, "data: d.jsonl\nprompt: '{question}'\nchoices: [yes, no]\nanswer: a\n",
                        ['{"q": "x", "a": 0}'])
    with pytest.raises(UserError, match="names the field 'question'"):
        load_task(field)
    with pytest.raises(UserError, match="cannot be loaded"):
        EvalModel.load(str(tmp_path / "no-such-model"))


def test_cli_refuses_an_unknown_task_with_exit_2(capsys):
    from lmforge.cli import main

    assert main(["eval", "--model", "smollm2-135m-instruct", "--tasks", "no-such-task"]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err


def test_cli_writes_results_the_leaderboard_reads(tmp_path, capsys):
    from infer_support import tiny_model_dir
    from lmforge.cli import main
    from lmforge.eval.results import load_results

    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_model_dir()), "--tasks", str(DATA / "capitals.yaml"), "--out", str(out)]) == 0
    assert "capitals" in capsys.readouterr().out
    results = load_results(out)
    assert results.tasks["capitals"].n == 4 and 0.0 <= results.tasks["capitals"].value <= 1.0


# ------------------------------------------------------------------ HumanEval sandbox

def test_humaneval_needs_the_opt_in_flag(tiny_lm):
    from lmforge.eval.task_data import load_task
    from lmforge.eval.tasks import run_task

    with pytest.raises(UserError, match="--allow-code-execution"):
        run_task(load_task("humaneval"), tiny_lm, limit=1)


def test_sandbox_kills_loops_blocks_sockets_and_passes_correct_code():
    from lmforge.eval.code_exec import Limits, check_problem, run_program
    from lmforge.eval.task_data import load_task

    problem = load_task("humaneval").docs[0]["problem"]
    assert check_problem(problem, problem["canonical_solution"])
    assert not check_problem(problem, "    return False\n")
    looping = run_program("while True:\n    pass\n", Limits(timeout_s=3, cpu_s=2))
    assert looping.status == "timeout" and not looping.passed
    network = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert network.status == "failed" and "network access is disabled" in network.output
    memory = run_program("x = bytearray(8 << 30)\n", Limits(memory_bytes=512 << 20))
    assert memory.status == "failed" and "MemoryError" in memory.output


def test_a_short_context_model_generates_at_most_half_its_context(tiny_lm, capsys):
    context = tiny_lm.engine().context_length
    long_prompt = "ROMEO: " * context                          # longer than the whole context
    [text] = tiny_lm.generate([long_prompt], until=[], max_tokens=4 * context)
    assert f"generating at most {context // 2} new tokens" in capsys.readouterr().err
    assert 0 < len(tiny_lm.tokenizer.encode(text)) <= context // 2 + 2    # (re-encoding may merge differently)
