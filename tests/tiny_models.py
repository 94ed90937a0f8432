"""Tiny random causal LMs of every architecture we promise to support, built from configs (no hub)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 260  # 256 byte tokens + <eos>/<pad> of tiny_tokenizer()
# Every Linear here has in/out features that are multiples of 32, so all of them get quantized.
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": lambda: tf.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "qwen3": lambda: tf.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
    "mistral": lambda: tf.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    # sliding window 8 < seqlen 16: the two layer types get different masks and rotary tables
    "gemma3": lambda: tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=0, eos_token_id=0),
    "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                word_embed_proj_dim=64, max_position_embeddings=128),
    # FalconLinear / GPTBigCode's attention Linear: transformers' weight init reads module.weight, which
    # compressed-tensors' compressed mode removes (eval/load_dtype.decompressed_retry_kwargs); fused qkv in one Linear
    "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      new_decoder_architecture=True, num_kv_heads=2),
    "gpt_bigcode": lambda: tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                               multi_query=True),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=128),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of `arch` in eval mode, deterministic for a seed."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_ids(n: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=gen)


def tiny_tokenizer():
    """A byte-level tokenizer (one token per byte, ids 0..255, <eos> 256, <pad> 257): no files, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab.update({"<eos>": 256, "<pad>": 257})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def saved_tiny_model(folder, arch: str = "llama"):
    """tiny_model(arch) and tiny_tokenizer() saved to `folder` (a model directory for the CLI); returns it."""
    tiny_model(arch).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def word_text_file(path, n_words: int = 3000):
    """A plain-text calibration file of `n_words` distinct words; returns its path."""
    path.write_text(" ".join(f"word{i}" for i in range(n_words)))
    return path
