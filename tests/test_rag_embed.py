"""Embeddings: our BERT + mean pooling equals sentence-transformers; batching and padding do not matter."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import UserError
from lmforge.rag.embed import Embedder, mean_pool
from rag_helpers import TEXTS, tiny_embedder


def test_mean_pool_ignores_padding_and_normalises():
    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    expected = torch.nn.functional.normalize(hidden[0, :2].mean(0), dim=0)
    assert torch.allclose(pooled[0], expected, atol=1e-6)
    assert torch.allclose(pooled.norm(dim=1), torch.ones(2), atol=1e-6)


def test_batched_encoding_equals_one_at_a_time():
    embedder = tiny_embedder()
    texts = list(TEXTS.values()) + ["short", "a much longer text " * 30]   # the last one is truncated to 64
    together = embedder.encode(texts, batch_size=3)
    alone = torch.cat([embedder.encode([text]) for text in texts])
    assert together.shape == (len(texts), 32)
    assert (together - alone).abs().max() < 1e-5
    assert len(embedder.token_ids(texts[-1])) == 64


def test_fingerprint_is_stable_and_tells_models_apart():
    assert tiny_embedder(0).fingerprint() == tiny_embedder(0).fingerprint()
    assert tiny_embedder(0).fingerprint() != tiny_embedder(1).fingerprint()


def test_bad_input_is_a_user_error():
    embedder = tiny_embedder()
    with pytest.raises(UserError, match="list of texts"):
        embedder.encode("a bare string")
    with pytest.raises(UserError, match="strings"):
        embedder.encode([None])


@pytest.mark.slow
def test_minilm_vectors_equal_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from lmforge.assets import minilm_dir

    ours = Embedder.load("minilm-l6")
    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    texts = list(TEXTS.values()) + ["Résumé of a naïve café in 東京", "word " * 400, "x"]   # one over 256 tokens
    theirs = torch.from_numpy(reference.encode(texts, batch_size=4))
    mine = ours.encode(texts, batch_size=3)
    assert mine.shape == theirs.shape == (len(texts), 384)
    assert float((mine - theirs).abs().max()) < 1e-5
    # The same model loaded twice has the same fingerprint (the unused MLM head is random each load).
    assert Embedder.load("minilm-l6").fingerprint() == ours.fingerprint()
