"""Model layouts for the benchmarks: the trainable tensors' shapes, without the models."""


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, kv: int) -> dict[str, tuple]:
    """The trainable tensors of a Llama (tied embeddings), by name."""
    shapes = {"embed_tokens": (vocab, hidden), "norm": (hidden,)}
    for i in range(layers):
        for name, shape in (("q_proj", (hidden, hidden)), ("k_proj", (kv, hidden)), ("v_proj", (kv, hidden)),
                            ("o_proj", (hidden, hidden)), ("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter)), ("input_layernorm", (hidden,)),
                            ("post_attention_layernorm", (hidden,))):
            shapes[f"layers.{i}.{name}"] = shape
    return shapes


SMOLLM2_135M = (576, 1536, 30, 49152, 192)  # hidden, intermediate, layers, vocabulary, key/value width
LLAMA_1B = (2048, 8192, 16, 128256, 512)
