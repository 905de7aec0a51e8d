"""The architecture matrix: tiny random configs of the transformers families a user would prefix-tune.

Each entry says what prefixtune must do with it: ``works`` (every mechanics check of
tests/test_architectures.py passes) or ``refused`` (PrefixTuner raises UnsupportedModelError
naming the architecture, with ``why`` saying what stands in the way). The README's support table is
generated from this list (``python scripts/support_table.py``), and a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers as tf
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

VOCAB = 256  # small: the LM head dominates a tiny model's cost; tiny_tokenizer() has exactly this many tokens

# The sizes every tiny config gets, under whichever names its config class uses.
SIZES = dict(
    hidden_size=32, d_model=32, n_embd=32, num_hidden_layers=2, n_layer=2, num_layers=2, encoder_layers=2,
    decoder_layers=2, num_decoder_layers=2, num_attention_heads=4, n_head=4, num_heads=4, encoder_attention_heads=4,
    decoder_attention_heads=4, num_key_value_heads=2, intermediate_size=64, ffn_dim=64, d_ff=64, encoder_ffn_dim=64,
    decoder_ffn_dim=64, n_inner=64, max_position_embeddings=256, n_positions=256, head_dim=8, d_kv=8, num_experts=4,
    num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4,
    shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
    v_head_dim=8, sliding_window=16,
)


def tiny_tokenizer():
    """A word-level tokenizer of VOCAB tokens (<pad>, <s> = 1, </s> = 2, <unk>, then words), so the
    text API (generate, score) runs on the tiny models; decoding joins words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("name : The Eagle | Type coffee shop hello there a longer source with more words in it is world short "
             "one table to text").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<s>", "</s>", "<unk>", *words]))}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   unk_token="<unk>")


@dataclass(frozen=True)
class Arch:
    model_type: str  # transformers' model_type
    family: str  # what the README calls it
    expect: str = "works"  # or "refused"
    why: str = ""  # for refused: what stands in the way
    attn: tuple[str, ...] = ("sdpa", "eager")  # implementations tested (eager-only models: ("eager",))
    config: dict = field(default_factory=dict)  # overrides on top of SIZES
    # decoder-only with relative positions: a words prefix equals the words in front of x
    rotary: bool = False

    @property
    def seq2seq(self) -> bool:
        return self.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    def build(self, attn: str, seed: int = 0):
        cls = CONFIG_MAPPING[self.model_type]
        if "text_config" in self.config:  # multimodal: the given sub-configs as they are
            config = cls(**self.config)
        else:
            defaults = cls()
            kw = {k: v for k, v in SIZES.items() if hasattr(defaults, k)
                  and not isinstance(getattr(cls, k, None), property)}  # e.g. Falcon's head_dim is derived
            kw.update(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
            if self.seq2seq:
                kw["decoder_start_token_id"] = 2
            kw.update(self.config)
            config = cls(**kw)
        names = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES if self.seq2seq else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        torch.manual_seed(seed)
        model = getattr(tf, names[self.model_type])._from_config(config, attn_implementation=attn)
        model.eval()
        model.requires_grad_(False)
        return model


ROPE = dict(rotary=True)
EAGER = ("eager",)
ARCHS = [
    # decoder-only
    Arch("gpt2", "GPT-2"),
    Arch("llama", "Llama 2/3, SmolLM2, TinyLlama", **ROPE),
    Arch("mistral", "Mistral (sliding window)", **ROPE),
    Arch("ministral", "Ministral", **ROPE),
    Arch("mixtral", "Mixtral (MoE)", **ROPE),
    Arch("qwen2", "Qwen2 / Qwen2.5", **ROPE),
    Arch("qwen2", "Qwen2 with sliding-window layers", config=dict(use_sliding_window=True, max_window_layers=1), **ROPE),
    Arch("qwen2_moe", "Qwen2-MoE", **ROPE),
    Arch("qwen3", "Qwen3", **ROPE),
    Arch("qwen3_moe", "Qwen3-MoE", **ROPE),
    Arch("gemma", "Gemma", **ROPE),
    Arch("gemma2", "Gemma-2 (soft-capping)", attn=EAGER, **ROPE),
    Arch("gemma3_text", "Gemma-3 1B (text)", **ROPE),
    Arch("gemma3", "Gemma-3 4B+ (image-text; the prefix goes on the language model)", **ROPE, config=dict(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=16,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=250, boi_token_index=248, eoi_token_index=249)),
    Arch("phi", "Phi-1/1.5/2", **ROPE),
    Arch("phi3", "Phi-3 / Phi-4", **ROPE),
    Arch("phimoe", "Phi-3.5-MoE", **ROPE),
    Arch("gpt_neox", "GPT-NeoX / Pythia", **ROPE),
    # rotary, but positions are looked up in a table (no negative positions): words recorded at 0..n-1
    Arch("gptj", "GPT-J", config=dict(rotary_dim=4)),
    Arch("codegen", "CodeGen", config=dict(rotary_dim=4)),
    Arch("opt", "OPT"),
    Arch("smollm3", "SmolLM3", **ROPE),
    Arch("starcoder2", "StarCoder2", **ROPE),
    Arch("gpt_bigcode", "GPT-BigCode / StarCoder (multi-query)"),
    Arch("olmo", "OLMo", **ROPE),
    Arch("olmo2", "OLMo-2", **ROPE),
    Arch("olmoe", "OLMoE", **ROPE),
    Arch("cohere", "Command-R (Cohere)", **ROPE),
    Arch("cohere2", "Command-R7B (Cohere2)", **ROPE),
    Arch("granite", "Granite", **ROPE),
    Arch("granitemoe", "Granite-MoE", **ROPE),
    Arch("glm", "GLM", **ROPE),
    Arch("glm4", "GLM-4", **ROPE),
    Arch("helium", "Helium", **ROPE),
    Arch("exaone4", "EXAONE-4", **ROPE),
    Arch("nemotron", "Nemotron", "refused", "its decoder layer does not pass the forward's keyword arguments to attention"),
    Arch("seed_oss", "Seed-OSS", **ROPE),
    Arch("hunyuan_v1_dense", "Hunyuan (dense)", **ROPE),
    Arch("deepseek_v2", "DeepSeek-V2 (multi-head latent attention)", config=dict(num_key_value_heads=4), **ROPE),
    Arch("deepseek_v3", "DeepSeek-V3 / R1 (multi-head latent attention)", config=dict(num_key_value_heads=4), **ROPE),
    Arch("gpt_oss", "gpt-oss (attention sinks)", attn=EAGER, **ROPE),
    Arch("persimmon", "Persimmon / Fuyu text", **ROPE),
    Arch("biogpt", "BioGPT"),
    Arch("xglm", "XGLM", "refused", "its attention is computed in its own code", attn=EAGER),
    Arch("stablelm", "StableLM", "refused",
         "its decoder layer does not pass the forward's keyword arguments to attention"),
    Arch("falcon", "Falcon", "refused", "its attention is computed outside transformers' attention interface"),
    Arch("bloom", "BLOOM (ALiBi)", "refused", "its attention (with ALiBi) is computed in its own code", attn=EAGER),
    Arch("mpt", "MPT (ALiBi)", "refused", "its attention (with ALiBi) is computed in its own code", attn=EAGER),
    Arch("gpt_neo", "GPT-Neo", "refused", "its attention is computed in its own code", attn=EAGER,
         config=dict(attention_types=[[["global", "local"], 1]], window_size=16)),
    Arch("mamba", "Mamba (state-space, no attention)", "refused", "it has no attention layers", attn=EAGER),
    # encoder-decoder
    Arch("t5", "T5 / Flan-T5"),
    Arch("mt5", "mT5"),
    Arch("umt5", "UMT5"),
    Arch("bart", "BART"),
    Arch("mbart", "mBART"),
    Arch("marian", "Marian (Opus-MT)"),
    Arch("pegasus", "Pegasus"),
    Arch("blenderbot", "Blenderbot"),
    Arch("plbart", "PLBart"),
    Arch("m2m_100", "M2M100"),
    Arch("longt5", "LongT5", "refused", "its attention is computed outside transformers' attention interface",
         attn=EAGER),
]
