"""Tiny conditioning encoders (a few channels) for tests and CPU smoke runs: the `cond_stage` section only.

`get_config()` is a tiny CLIP text transformer; `get_config("bert")` the LDM BERT-style embedder;
`get_config("class")` a class embedder. Built and run by its test:
  .venv/bin/python -m pytest -q tests/test_text.py -k text_tiny
"""
import ml_collections


def get_config(kind: str = "clip") -> ml_collections.ConfigDict:
    """Returns a locked ConfigDict with a tiny `cond_stage` of the given kind ("clip", "bert" or "class")."""
    sections = {
        "clip": dict(kind="clip", vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, max_length=77, hidden_act="quick_gelu", eos_token_id=999, pooling="argmax",
                     output_layer="last", pad_token_id=999, tokenizer_kind="clip"),
        "bert": dict(kind="bert", vocab_size=1000, max_length=77, n_embed=32, n_layer=2, heads=4, dim_head=8,
                     ff_mult=4, pad_token_id=0, tokenizer_kind="bert"),
        "class": dict(kind="class", n_classes=11, embed_dim=32),
    }
    if kind not in sections:
        raise ValueError(f"text_tiny: unknown kind {kind!r}; expected one of {sorted(sections)}")
    config = ml_collections.ConfigDict({"cond_stage": sections[kind]})
    config.lock()
    return config
