"""A tiny *trained* GPT + BPE tokenizer shared by the infer/serve tests (built once per process).

A few seconds of training on a Shakespeare play gives peaked next-token distributions, so greedy
decoding has clear margins and batched-vs-alone comparisons test the engine, not float noise.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from threads import one_thread

TRAIN_STEPS = 80


@functools.lru_cache(maxsize=1)
def tiny_model_dir() -> Path:
    """A tiny model saved in the lmforge format (config.json, model.safetensors, tokenizer/)."""
    from lmforge.assets import shakespeare_play_files
    from lmforge.model import build_model, get_preset
    from lmforge.model.loading import save_pretrained
    from lmforge.tokenizer.train import train_bpe_on_texts

    text = shakespeare_play_files()[0].read_text(encoding="utf-8")[20_000:60_000]
    tokenizer = train_bpe_on_texts([text], vocab_size=512)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model(get_preset("nano", vocab_size=tokenizer.vocab_size))
    data = torch.tensor(tokenizer.encode(text))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    with one_thread():
        for _ in range(TRAIN_STEPS):
            starts = torch.randint(0, len(data) - 49, (8,), generator=generator)
            batch = torch.stack([data[s:s + 49] for s in starts])
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    directory = Path(tempfile.mkdtemp(prefix="lmforge-infer-tiny-")) / "tiny-shakespeare"
    save_pretrained(model, tokenizer, directory)
    return directory


def load_tiny():
    """(model, tokenizer) of the tiny trained model, loaded fresh."""
    import lmforge

    return lmforge.load(str(tiny_model_dir()))
