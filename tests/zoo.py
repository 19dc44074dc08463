"""Small models with known FFNs, built offline, for the compiler tests.

Every entry says how many FFNs the model holds and how to make an input for it, so one parametrised test
can check "sites found == FFNs" and "upcycled MoE == original" across toy, PyTorch and Hugging Face models.
Dropout probabilities are 0 so train mode is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL = 32
D_FF = 64
VOCAB = 100


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    num_ffns: int
    inputs: Callable[[int, int], dict]  # (batch, seq) -> forward kwargs
    causal_lm: bool = False
    mot: bool = True  # False where the FFN sees flattened [tokens, d] inputs, which MoT cannot group


def token_inputs(batch: int, seq: int) -> dict:
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=generator)}


def float_inputs(batch: int, seq: int) -> dict:
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    return {"x": torch.randn(batch, seq, D_MODEL, generator=generator)}


def encoder_inputs(batch: int, seq: int) -> dict:
    return {"src": float_inputs(batch, seq)["x"]}


def seq_first_inputs(batch: int, seq: int) -> dict:
    return {"src": float_inputs(batch, seq)["x"].transpose(0, 1).contiguous()}


def t5_inputs(batch: int, seq: int) -> dict:
    ids = token_inputs(batch, seq)["input_ids"]
    return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}


def image_inputs(batch: int, seq: int) -> dict:
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}


# ---- own toy models -------------------------------------------------------------------------------------


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_MODEL, D_FF)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D_MODEL, D_FF, bias=False)
        self.up = nn.Linear(D_MODEL, D_FF, bias=False)
        self.down = nn.Linear(D_FF, D_MODEL, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Residual(nn.Module):
    """Pre-norm residual around any FFN module."""

    def __init__(self, ffn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class Stack(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class FunctionalBlock(nn.Module):
    """An FFN written inline: module linears, a functional activation, the residual in the same forward."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.fc = nn.Linear(D_MODEL, D_FF)
        self.proj = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.norm(x)), approximate="tanh"))


class ParameterBlock(nn.Module):
    """An FFN held as bare parameters and applied with ``F.linear`` and a tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.w1 = nn.Parameter(torch.randn(D_FF, D_MODEL) / math.sqrt(D_MODEL))
        self.b1 = nn.Parameter(torch.zeros(D_FF))
        self.w2 = nn.Parameter(torch.randn(D_MODEL, D_FF) / math.sqrt(D_FF))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(self.norm(x), self.w1, self.b1).relu()
        return x + F.linear(hidden, self.w2)


def plain_mlp() -> nn.Module:
    return Stack([Residual(PlainMLP()), Residual(PlainMLP())])


def gated_mlp() -> nn.Module:
    return Stack([Residual(GatedMLP()), Residual(GatedMLP())])


def functional_block() -> nn.Module:
    return Stack([FunctionalBlock(), ParameterBlock()])


def sequential_ffn() -> nn.Module:
    """One FFN is a whole ``nn.Sequential``, the other a slice of one (after a norm)."""
    whole = nn.Sequential(nn.Linear(D_MODEL, D_FF), nn.SiLU(), nn.Linear(D_FF, D_MODEL))
    sliced = nn.Sequential(
        nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, D_FF), nn.GELU(), nn.Dropout(0.0), nn.Linear(D_FF, D_MODEL)
    )
    return Stack([Residual(whole), sliced])


# ---- nanoGPT-style GPT ----------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, n_head: int = 4) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.c_proj = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(D_MODEL, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class NanoMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(D_MODEL, 4 * D_MODEL)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * D_MODEL, D_MODEL)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(D_MODEL)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(D_MODEL)
        self.mlp = NanoMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, n_layer: int = 2, block_size: int = 16) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(VOCAB, D_MODEL),
                "wpe": nn.Embedding(block_size, D_MODEL),
                "h": nn.ModuleList(NanoBlock() for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(D_MODEL),
            }
        )
        self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.size(1)
        assert t <= self.block_size, f"sequence of {t} tokens is longer than block_size {self.block_size}"
        pos = torch.arange(t, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---- nn.TransformerEncoder ------------------------------------------------------------------------------


def transformer_encoder(batch_first: bool = True, activation: str = "relu") -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        D_MODEL, nhead=4, dim_feedforward=D_FF, dropout=0.0, activation=activation, batch_first=batch_first
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)


def transformer_encoder_seq_first() -> nn.Module:
    """``batch_first=False``: the FFN sees ``[T, B, d]``, so an MoT block must be built sequence-first."""
    return transformer_encoder(batch_first=False, activation="gelu")


# ---- Hugging Face models from small configs -------------------------------------------------------------


def _small(config_cls: type, **kwargs: object) -> object:
    base = {
        "hidden_size": D_MODEL,
        "intermediate_size": D_FF,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
    }
    base.update(kwargs)
    return config_cls(**base)


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=D_MODEL,
        n_inner=D_FF,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config)


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(_small(LlamaConfig, num_key_value_heads=2))


def hf_mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(_small(MistralConfig, num_key_value_heads=2))


def hf_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(_small(Qwen2Config, num_key_value_heads=2))


def hf_phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = _small(
        Phi3Config,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    return Phi3ForCausalLM(config)


def hf_phi() -> nn.Module:
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM(_small(PhiConfig, resid_pdrop=0.0, embd_pdrop=0.0))


def hf_gpt_neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(_small(GPTNeoXConfig, hidden_dropout=0.0))


def hf_falcon() -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        hidden_size=D_MODEL,
        ffn_hidden_size=D_FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        new_decoder_architecture=False,
    )
    return FalconForCausalLM(config)


def hf_opt() -> nn.Module:
    """OPT's FFN is inline in the decoder layer's forward, next to attention, on flattened tokens."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=D_MODEL,
        ffn_dim=D_FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        word_embed_proj_dim=D_MODEL,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return OPTForCausalLM(config)


def hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = _small(BertConfig, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False)


def _t5(feed_forward_proj: str) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=D_MODEL,
        d_ff=D_FF,
        d_kv=8,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        vocab_size=VOCAB,
        dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def hf_t5() -> nn.Module:
    return _t5("relu")


def hf_t5_gated() -> nn.Module:
    return _t5("gated-gelu")


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    config = _small(
        ViTConfig, image_size=16, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return ViTModel(config, add_pooling_layer=False)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in [
        ZooEntry("plain_mlp", plain_mlp, 2, float_inputs),
        ZooEntry("gated_mlp", gated_mlp, 2, float_inputs),
        ZooEntry("functional_block", functional_block, 2, float_inputs),
        ZooEntry("sequential_ffn", sequential_ffn, 2, float_inputs),
        ZooEntry("nanogpt", NanoGPT, 2, token_inputs),
        ZooEntry("transformer_encoder", transformer_encoder, 2, encoder_inputs),
        ZooEntry("encoder_seq_first", transformer_encoder_seq_first, 2, seq_first_inputs),
        ZooEntry("gpt2", hf_gpt2, 2, token_inputs, causal_lm=True),
        ZooEntry("llama", hf_llama, 2, token_inputs, causal_lm=True),
        ZooEntry("mistral", hf_mistral, 2, token_inputs, causal_lm=True),
        ZooEntry("qwen2", hf_qwen2, 2, token_inputs, causal_lm=True),
        ZooEntry("phi3", hf_phi3, 2, token_inputs, causal_lm=True),
        ZooEntry("phi", hf_phi, 2, token_inputs, causal_lm=True),
        ZooEntry("gpt_neox", hf_gpt_neox, 2, token_inputs, causal_lm=True),
        ZooEntry("falcon", hf_falcon, 2, token_inputs, causal_lm=True),
        ZooEntry("opt", hf_opt, 2, token_inputs, causal_lm=True, mot=False),
        ZooEntry("bert", hf_bert, 2, token_inputs),
        ZooEntry("t5", hf_t5, 4, t5_inputs),
        ZooEntry("t5_gated", hf_t5_gated, 4, t5_inputs),
        ZooEntry("vit", hf_vit, 2, image_inputs),
    ]
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return ZOO[name].build()
