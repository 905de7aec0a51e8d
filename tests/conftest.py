"""Tiny randomly initialised models of real architectures, and the embedded SmolLM2."""

import os

import pytest
import torch
import transformers as tf
from transformers import AutoTokenizer

import prefixtune as pt
from prefixtune.models import _embedded_dir

VOCAB = 49152  # the SmolLM2 tokenizer's; tiny models share it so the text API can be tested on them
TINY_ARCHS = ["gpt2", "llama-gqa", "qwen2", "bart", "t5"]
CAUSAL_ARCHS = ["gpt2", "llama-gqa", "qwen2"]
SEQ2SEQ_ARCHS = ["bart", "t5"]

# Under pytest-xdist (scripts/test.sh runs one worker per core), each worker and the processes its tests
# start get their share of the cores: more torch threads than cores make every small op wait on spinning
# threads (a test of tiny models ran 50x slower beside a 2-thread job).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(_threads)


def tiny_model(arch: str, seed: int = 0, init_range: float = 0.02):
    """``init_range`` > 0.02 makes outputs depend more on attention (decoder-only archs), for training tests."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=init_range)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common))
    elif arch == "llama-gqa":  # grouped-query attention, head_dim * heads != hidden
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                   tie_word_embeddings=True, **common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=1,
                                                   tie_word_embeddings=True, **common))
    elif arch == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512, decoder_start_token_id=2,
            forced_eos_token_id=None, **common))
    elif arch == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, **common))
    else:
        raise ValueError(arch)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(_embedded_dir("smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2():
    return pt.load_base_model("smollm2-135m")


def random_prefix(model, length: int, seed: int, scale: float = 1.0):
    """An exported prefix with random keys/values (for mechanics tests that need no training)."""
    torch.manual_seed(seed)
    tuner = pt.PrefixTuner(model, pt.PrefixConfig(length=length, reparameterize=False))
    with torch.no_grad():
        for p in tuner.parameters():
            p.mul_(scale)
    return tuner.export()
