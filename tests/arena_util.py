"""Helpers for the arena tests: tiny models saved as a TopoCL run and an HF directory, a live server."""

from __future__ import annotations

import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
TEXTS = [f"Player: I look around.\nGM: The {w} sword glows in Thornwall. Magic is paid for with memories."
         for w in ("frost", "fire", "storm", "moon")] * 10


def tiny_topocl_run(path: Path) -> Path:
    """A TopoCL run directory (config.yaml, tokenizer.json, one checkpoint) of an untrained tiny GPT."""
    from topocl.checkpoint import save_checkpoint
    from topocl.config import ModelConfig, PretrainConfig, save_config
    from topocl.model import GPT
    from topocl.tokenizer import Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train(TEXTS, 300)
    cfg = PretrainConfig(out_dir=str(path), model=ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32,
                                                              n_head=2, n_kv_head=1, max_seq_len=96))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_config(cfg, path / "config.yaml")
    tok.save(path / "tokenizer.json")
    save_checkpoint(path / "checkpoints", 0, model, None, {"next_step": 0})
    return path


def tiny_hf_dir(path: Path, heads: int = 2, kv_heads: int = 1, hidden: int = 16) -> Path:
    """A tiny LlamaForCausalLM (from a config, untrained) and its tokenizer saved as an HF model directory
    (heads=4, kv_heads=2, hidden=32: two KV groups, so a head split leaves a group A and a group B)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Serve `app` with uvicorn on a free loopback port in a daemon thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
