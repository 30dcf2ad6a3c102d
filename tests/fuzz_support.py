"""Valid tiny artifacts for the CLI fuzz tests (tests/test_cli_fuzz.py), and ways to damage them.

`build_artifacts(root)` writes, in a few seconds:
    root/tok          a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)
    root/gpt2-files   the same tokenizer as GPT-2 vocab.json + merges.txt
    root/corpus       eight small text documents
    root/shards       train.bin / val.bin / meta.json prepared from them
    root/lm           an lmforge model directory (tiny Llama-style GPT) with the tokenizer
    root/hf-gpt2, root/hf-bert, root/hf-llama   Hugging Face directories exported from tiny models
    root/model.gguf   a tiny Llama GGUF (F32 tensors) with the tokenizer in its metadata
    root/runs/run     a run directory: config.yaml + metrics.jsonl
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

TEXTS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "All the world's a stage, and all the men and women merely players; they have their exits.",
    "If music be the food of love, play on; give me excess of it, that, surfeiting, the appetite may sicken.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: rough winds do shake.",
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath.",
    "Once more unto the breach, dear friends, once more; or close the wall up with our English dead.",
]


def copy(base: Path, name: str, work: Path) -> Path:
    """A private copy of one artifact, to damage."""
    source, target = base / name, work / name
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    return target


def edit_json(path: Path, change: Any) -> None:
    """Rewrite a JSON file with change(data) (which may mutate data in place or return a new value)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    result = change(data)
    path.write_text(json.dumps(data if result is None else result), encoding="utf-8")


def write_rows(path: Path, rows: list[Any]) -> None:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
                    encoding="utf-8")


def permute_for_gguf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter: HF half-split q/k rows -> interleaved RoPE pairs."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path: Path, model: Any, tokenizer: Any, metadata: dict[str, Any] | None = None,
               drop: tuple[str, ...] = (), tensors: dict[str, np.ndarray | None] | None = None) -> None:
    """Our Llama-style GPT and BPE tokenizer as a GGUF file (F32 tensors, llama.cpp's names).

    metadata: key -> (value, GGUFValueType[, item type]) written instead of the real value;
    drop: metadata keys left out; tensors: name -> array to write instead (None leaves it out).
    """
    import gguf
    from gguf import GGUFValueType as V

    from lmforge.model.hf import export_state_dict
    from lmforge.tokenizer.byte_level import bytes_to_token_string

    config = model.config
    hf = export_state_dict(model)
    by_id = {index: bytes_to_token_string(token) for token, index in tokenizer.vocab.items()}
    by_id.update({index: text for text, index in tokenizer.special_tokens.items()})
    tokens = [by_id.get(index, f"<unused{index}>") for index in range(tokenizer.vocab_size)]
    values: dict[str, tuple] = {
        "llama.block_count": (config.n_layers, V.UINT32),
        "llama.context_length": (config.max_seq_len, V.UINT32),
        "llama.embedding_length": (config.d_model, V.UINT32),
        "llama.feed_forward_length": (config.d_ff, V.UINT32),
        "llama.attention.head_count": (config.n_heads, V.UINT32),
        "llama.attention.head_count_kv": (config.n_kv_heads, V.UINT32),
        "llama.attention.layer_norm_rms_epsilon": (config.norm_eps, V.FLOAT32),
        "llama.rope.freq_base": (config.rope_theta, V.FLOAT32),
        "llama.vocab_size": (config.vocab_size, V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("gpt2", V.STRING),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": ([3 if t in tokenizer.special_tokens else 1 for t in tokens], V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": ([f"{bytes_to_token_string(a)} {bytes_to_token_string(b)}"
                                   for a, b in tokenizer.merges], V.ARRAY, V.STRING),
        "tokenizer.ggml.eos_token_id": (tokenizer.eot_id, V.UINT32),
    }
    values.update(metadata or {})
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, kind, *item) in values.items():
        if key not in drop:
            writer.add_key_value(key, value, kind, sub_type=item[0] if item else None)
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in hf.items():
        if name == "lm_head.weight":
            continue
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        short = name.split(".", 3)[3] if layer is not None else name
        gguf_name = f"blk.{layer}.{GGUF_NAMES[short]}" if layer is not None else GGUF_NAMES[short]
        if short == "self_attn.q_proj.weight":
            tensor = permute_for_gguf(tensor, config.n_heads)
        elif short == "self_attn.k_proj.weight":
            tensor = permute_for_gguf(tensor, config.n_kv_heads)
        arrays[gguf_name] = tensor.float().numpy()
    arrays.update(tensors or {})
    for name, array in arrays.items():
        if array is not None:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_artifacts(root: Path) -> dict[str, Any]:
    from lmforge.data import prepare_shards
    from lmforge.model import build_model, get_preset
    from lmforge.model.hf import export_hf
    from lmforge.model.loading import save_pretrained
    from lmforge.tokenizer import train_bpe_on_texts
    from lmforge.track.tracker import Tracker

    torch.manual_seed(0)
    tokenizer = train_bpe_on_texts(TEXTS * 3, vocab_size=300)
    tokenizer.save(root / "tok")
    tokenizer.save_gpt2_files(root / "gpt2-files")
    corpus = root / "corpus"
    corpus.mkdir()
    for index, text in enumerate(TEXTS):
        (corpus / f"doc{index}.txt").write_text(text, encoding="utf-8")
    prepare_shards(corpus, root / "tok", root / "shards", val_fraction=0.25, num_workers=1, progress=False)

    vocab = tokenizer.vocab_size
    llama = build_model(get_preset("nano", vocab_size=vocab, max_seq_len=64, d_model=32, n_heads=2, n_kv_heads=1))
    save_pretrained(llama, tokenizer, root / "lm")
    export_hf(llama, tokenizer, root / "hf-llama")
    export_hf(build_model(get_preset("gpt2-nano", vocab_size=vocab, max_seq_len=64, d_model=32, n_heads=2)),
              tokenizer, root / "hf-gpt2")
    export_hf(build_model(get_preset("bert-nano", vocab_size=vocab, max_seq_len=64, d_model=32, n_heads=2)),
              tokenizer, root / "hf-bert")
    write_gguf(root / "model.gguf", llama, tokenizer)

    run = root / "runs" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("objective: clm\nmodel: {arch: gpt, n_layers: 2, d_model: 32}\n")
    with Tracker(run, {}) as tracker:
        for step in range(1, 6):
            tracker.log(step, {"loss": 4.0 / step, "lr": 1e-3, "tokens_per_s": 100.0, "tokens_seen": 64 * step})
        tracker.log(5, {"val_loss": 1.5, "val_bpb": 0.5})
    return {"tokenizer": tokenizer, "llama": llama}
