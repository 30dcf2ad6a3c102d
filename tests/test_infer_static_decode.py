"""The static (compilable) decode step equals the model's own forward; run eagerly to stay fast."""
from __future__ import annotations

import pytest
import torch

from infer_support import load_tiny
from lmforge.errors import UserError
from lmforge.infer import Engine, SamplingParams
from lmforge.infer.static_decode import StaticDecodeStep
from lmforge.model import build_model, get_preset

PROMPTS = ["ROMEO:", "To be or not to be, that is", "The king", "What say you, my lord? I pray you tell me", "O"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", ["nano", "gpt2-nano"])   # RoPE + RMSNorm + SwiGLU, and learned + LayerNorm + GELU
def test_static_step_equals_the_model_forward_for_rows_of_different_lengths(preset):
    torch.manual_seed(0)
    model = build_model(get_preset(preset, vocab_size=97)).eval()
    cache = model.new_kv_cache(batch_size=4, max_seq_len=32)
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 9, 5)]
    with torch.inference_mode():
        for row, prompt in zip((0, 2, 3), prompts):            # row 1 stays idle
            model(prompt[None], kv_cache=cache, cache_rows=torch.tensor([row]))
        step = StaticDecodeStep(model, cache, compile=False)
        new = torch.tensor([11, 0, 22, 33])
        hidden = step(new)
        for row, prompt in zip((0, 2, 3), prompts):
            reference = model.hidden_states(torch.cat([prompt, new[row:row + 1]])[None])[0, -1]
            assert torch.allclose(hidden[row], reference, atol=1e-5)


def test_engine_with_the_static_step_gives_the_same_tokens():
    model, tokenizer = load_tiny()
    params = SamplingParams(max_new_tokens=20, repetition_penalty=1.3)
    generic = Engine(model, tokenizer, max_batch_size=4).generate(PROMPTS, params)
    engine = Engine(model, tokenizer, max_batch_size=4)
    engine.static_step = StaticDecodeStep(model, engine.cache, compile=False)
    static = engine.generate(PROMPTS, params)
    assert [r.token_ids for r in static] == [r.token_ids for r in generic]
    alone = [engine.generate([prompt], params)[0] for prompt in PROMPTS]
    assert [r.token_ids for r in alone] == [r.token_ids for r in generic]


def test_unsupported_models_are_refused_clearly():
    model = build_model(get_preset("moe-tiny", vocab_size=97)).eval()
    with pytest.raises(UserError, match="mixture-of-experts"):
        StaticDecodeStep(model, model.new_kv_cache(1, 16), compile=False)
