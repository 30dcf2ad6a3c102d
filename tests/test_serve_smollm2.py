"""The real SmolLM2-135M-Instruct (bundled GGUF) behind the live server, through the `openai` client."""
from __future__ import annotations

import openai
import pytest

from lmforge.infer import Engine, SamplingParams, render_chat
from lmforge.serve.app import create_app
from lmforge.serve.server import BackgroundServer

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    import lmforge

    return lmforge.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def client(smollm2):
    model, tokenizer = smollm2
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=256, context_policy="error")
    with BackgroundServer(create_app(engine, "smollm2-135m-instruct")) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_smollm2_chat_template_is_its_own(smollm2):
    _, tokenizer = smollm2
    default = render_chat(tokenizer, QUESTION)
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert default.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    custom = render_chat(tokenizer, [{"role": "system", "content": "Answer in French."}] + QUESTION)
    assert custom.startswith("<|im_start|>system\nAnswer in French.<|im_end|>") and "SmolLM" not in custom


def test_smollm2_answers_through_the_openai_client(client):
    response = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                              max_tokens=20, temperature=0)
    answer = response.choices[0].message.content
    assert "Paris" in answer
    assert response.choices[0].finish_reason == "stop"           # it ended its turn with <|im_end|>
    assert 0 < response.usage.completion_tokens <= 20

    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                            max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == answer


def test_smollm2_completion_streams_the_same_text_as_generate(client, smollm2):
    model, tokenizer = smollm2
    prompt = "The three primary colors are"
    expected = Engine(model, tokenizer, max_batch_size=1, max_seq_len=256).generate(
        [prompt], SamplingParams(max_new_tokens=12))[0].text
    stream = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=12,
                                       temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected
    assert expected.strip()
