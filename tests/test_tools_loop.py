"""The tool-call loop (lmforge.infer.tools) through the real Engine, driven by a scripted model."""
from __future__ import annotations

import pytest

from lmforge.infer import Engine, SamplingParams
from lmforge.infer.tools import MAX_CALLS, ToolLoop, ToolRegistry
from tools_support import scripted_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run(script, registry=None, prompts=("Q: what is 2+3?",), max_new_tokens=60, **loop_options):
    model, tokenizer = scripted_model(script)
    engine = Engine(model, tokenizer, max_batch_size=4)
    loop = ToolLoop(engine, registry or ToolRegistry.builtin("calculator"), **loop_options)
    return loop.generate(list(prompts), SamplingParams(max_new_tokens=max_new_tokens)), model


def after_result(result_text: str, first: str, then: str):
    """A script: write `first` until the context holds `result_text`, then `then`."""
    return lambda context: then if result_text in context else first


def test_a_call_pauses_runs_the_tool_inserts_the_result_and_continues():
    [result], model = run(after_result("→ 5]", "Let me see [calculator(2+3)→ junk after the arrow", " so it is 5."))
    assert result.text == "Let me see [calculator(2+3)→ 5] so it is 5."
    assert [(c.name, c.arguments, c.result, c.error) for c in result.calls] == [
        ("calculator", {"expression": "2+3"}, "5", None)]
    assert result.rounds == 2 and result.finish_reason == "stop"
    # The second round was prefilled with the prompt + the text so far (re-prefill, not the old row).
    assert model.prompts[-1] == "Q: what is 2+3?Let me see [calculator(2+3)→ 5]"


def test_a_tool_that_raises_becomes_an_error_result_and_generation_goes_on():
    registry = ToolRegistry()

    def boom(query: str) -> str:
        raise ValueError("the service is down")

    registry.register("lookup", boom, "looks things up",
                      {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})
    [result], _ = run(after_result("down]", "[lookup(Paris)→", " Sorry."), registry)
    assert result.text == "[lookup(Paris)→ error: ValueError: the service is down] Sorry."
    assert result.calls[0].error == "ValueError: the service is down"


@pytest.mark.parametrize("call, error", [
    ("[calculator(2+3→", "malformed tool call"),
    ("[weather(Paris)→", "unknown tool 'weather'; the tools are calculator"),
    ("[calculator(import os)→", "'import os' is not an arithmetic expression"),
    ('[calculator({"expression": )→', "bad arguments for calculator: the arguments are not valid JSON"),
    ('[calculator({"expr": 1})→', "missing expression"),
    ("[calculator(2**99999)→", "CalculatorError: the exponent 99999 is too large"),
])
def test_malformed_and_refused_calls_get_a_clear_result_text(call, error):
    [result], _ = run(after_result("]", call, " ok."))
    assert result.finish_reason == "stop" and result.text.endswith("] ok.")
    assert error in result.calls[0].result and result.calls[0].result.startswith("error: ")


def test_a_call_that_never_closes_is_reported_not_run():
    [ended], _ = run(lambda context: "[calculator(2+3 and then the model just stops")
    assert ended.text == "[calculator(2+3 and then the model just stops"
    assert ended.finish_reason == "stop" and ended.calls[0].result is None
    assert "never reached '→'" in ended.calls[0].error
    [cut], _ = run(lambda context: "[calculator(1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1", max_new_tokens=8)
    assert cut.finish_reason == "length" and "never reached" in cut.calls[0].error


def test_an_arrow_in_ordinary_text_is_kept_and_runs_nothing():
    [result], _ = run(after_result("→", "a → b", "never used"))
    assert result.calls == [] and result.text.startswith("a →")


def test_a_model_that_keeps_calling_stops_at_the_call_limit():
    [result], _ = run(lambda context: "[calculator(1+1)→", max_new_tokens=400, max_calls=3)
    assert len(result.calls) == 3 and result.text.count("→ 2]") == 3
    assert MAX_CALLS >= 3


def test_rows_of_one_batch_call_tools_independently_and_stream_equals_generate():
    def script(context: str) -> str:
        if "first" in context:
            return " done." if "→ 12]" in context else "[calculator(3*4)→"
        return "no tools needed"

    results, _ = run(script, prompts=["first?", "second?"])
    assert [r.text for r in results] == ["[calculator(3*4)→ 12] done.", "no tools needed"]
    model, tokenizer = scripted_model(script)
    loop = ToolLoop(Engine(model, tokenizer, max_batch_size=2), ToolRegistry.builtin("calculator"))
    pieces = list(loop.stream("first?", SamplingParams(max_new_tokens=60)))
    assert "".join(pieces) == results[0].text == loop.last.text
    assert "→ 12]" in pieces   # the inserted result arrives as one piece


def test_user_tools_take_json_arguments_and_return_json():
    registry = ToolRegistry()
    registry.register("add", lambda a, b: {"sum": a + b}, "adds",
                      {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]})
    [result], _ = run(after_result("}]", '[add({"a": 2, "b": 40})→', " fine"), registry)
    assert result.text == '[add({"a": 2, "b": 40})→ {"sum": 42}] fine'
    assert result.calls[0].arguments == {"a": 2, "b": 40}


def test_retrieval_needs_an_existing_index(tmp_path):
    from lmforge.errors import UserError

    with pytest.raises(UserError, match="needs an index"):
        ToolRegistry.builtin("retrieval")
    with pytest.raises(UserError, match="does not exist"):
        ToolRegistry.builtin("retrieval", tmp_path / "missing")
    with pytest.raises(UserError, match="unknown tool 'shell'"):
        ToolRegistry.builtin("calculator,shell")


def test_retrieval_searches_the_rag_index_lazily(tmp_path, monkeypatch):
    import sys
    import types
    from dataclasses import dataclass

    import lmforge

    @dataclass
    class Passage:     # the shape of lmforge.rag's passages
        title: str
        text: str
        score: float

    loaded = []

    class FakeIndex:
        def search(self, query: str, k: int):
            return [Passage("Paris", f"Paris is the capital of France ({query}).", 0.9),
                    Passage("Lyon", "Lyon is a city   in France.", 0.5)][:k]

    fake = types.ModuleType("lmforge.rag")
    fake.load_index = lambda directory: loaded.append(directory) or FakeIndex()
    monkeypatch.setitem(sys.modules, "lmforge.rag", fake)
    monkeypatch.setattr(lmforge, "rag", fake, raising=False)
    registry = ToolRegistry.builtin("calculator,retrieval", tmp_path)
    assert loaded == []                                 # nothing loaded until the first call
    call = registry.run("[retrieval(capital of France)")
    assert call.result == ("Paris: Paris is the capital of France (capital of France). | "
                           "Lyon: Lyon is a city in France.")
    registry.run("[retrieval(again)")
    assert loaded == [str(tmp_path)]                    # loaded once
