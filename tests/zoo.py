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


def seq2seq_inputs(batch: int, seq: int) -> dict:
    """``nn.Transformer``'s ``src`` and ``tgt``, batch-first (the target one token shorter)."""
    x = float_inputs(batch, seq)["x"]
    return {"src": x, "tgt": x[:, 1:].flip(1).contiguous()}


def seq2seq_seq_first_inputs(batch: int, seq: int) -> dict:
    return {name: t.transpose(0, 1).contiguous() for name, t in seq2seq_inputs(batch, seq).items()}


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


# ---- timm-style vision transformers (hand-written: timm is not a dependency) -----------------------------


class TimmMlp(nn.Module):
    """timm's ``Mlp``: fc1 -> act -> drop1 -> norm (Identity) -> fc2 -> drop2."""

    def __init__(self, hidden: int = D_FF, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(D_MODEL, hidden), nn.GELU(), nn.Dropout(drop)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, D_MODEL), nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmGluMlp(nn.Module):
    """timm's ``GluMlp`` / ``SwiGLUPacked``: one fc1 of twice the width, chunked; the second half gated."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = nn.Linear(D_MODEL, 2 * D_FF), nn.SiLU()
        self.drop1, self.norm, self.fc2 = nn.Dropout(0.0), nn.Identity(), nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(self.drop1(x1 * self.act(x2))))


class TimmBlock(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(D_MODEL), nn.MultiheadAttention(D_MODEL, 4, batch_first=True)
        self.norm2, self.mlp = nn.LayerNorm(D_MODEL), mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """Patch embedding, a class token, blocks, a head: timm's ``VisionTransformer`` in miniature."""

    def __init__(self, glu: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, D_MODEL, kernel_size=8, stride=8)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D_MODEL))
        self.blocks = nn.Sequential(*(TimmBlock(TimmGluMlp() if glu else TimmMlp()) for _ in range(2)))
        self.norm, self.head = nn.LayerNorm(D_MODEL), nn.Linear(D_MODEL, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---- nn.TransformerEncoder ------------------------------------------------------------------------------


def transformer_encoder(batch_first: bool = True, activation: str = "relu") -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        D_MODEL, nhead=4, dim_feedforward=D_FF, dropout=0.0, activation=activation, batch_first=batch_first
    )
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first)


def transformer_encoder_seq_first() -> nn.Module:
    """``batch_first=False``: the FFN sees ``[T, B, d]``, so an MoT block must be built sequence-first."""
    return transformer_encoder(batch_first=False, activation="gelu")


def transformer(batch_first: bool = True) -> nn.Module:
    """``nn.Transformer``: an encoder and a decoder stack of two layers each (four FFNs)."""
    return nn.Transformer(
        D_MODEL,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=D_FF,
        dropout=0.0,
        batch_first=batch_first,
    )


def transformer_seq_first() -> nn.Module:
    """``nn.Transformer`` with its default ``batch_first=False``: ``[T, B, d]`` in both stacks."""
    return transformer(batch_first=False)


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


def hf_qwen2_moe() -> nn.Module:
    """A tiny Qwen2-MoE in eval mode (transformers' own routed experts beside a dense shared expert)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(config).eval()


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
        ZooEntry("timm_vit", TimmViT, 2, image_inputs),
        ZooEntry("timm_vit_glu", lambda: TimmViT(glu=True), 2, image_inputs),
        ZooEntry("transformer_encoder", transformer_encoder, 2, encoder_inputs),
        ZooEntry("encoder_seq_first", transformer_encoder_seq_first, 2, seq_first_inputs),
        ZooEntry("transformer", transformer, 4, seq2seq_inputs),
        ZooEntry("transformer_seq_first", transformer_seq_first, 4, seq2seq_seq_first_inputs),
        ZooEntry("gpt2", hf_gpt2, 2, token_inputs, causal_lm=True),
        ZooEntry("llama", hf_llama, 2, token_inputs, causal_lm=True),
        ZooEntry("mistral", hf_mistral, 2, token_inputs, causal_lm=True),
        ZooEntry("qwen2", hf_qwen2, 2, token_inputs, causal_lm=True),
        ZooEntry("phi3", hf_phi3, 2, token_inputs, causal_lm=True),
        ZooEntry("phi", hf_phi, 2, token_inputs, causal_lm=True),
        ZooEntry("gpt_neox", hf_gpt_neox, 2, token_inputs, causal_lm=True),
        ZooEntry("falcon", hf_falcon, 2, token_inputs, causal_lm=True),
        ZooEntry("opt", hf_opt, 2, token_inputs, causal_lm=True),
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


# ---- the generated Hugging Face zoo ---------------------------------------------------------------------
#
# Every text family transformers ships with a causal-LM, masked-LM or seq2seq head, built from its own
# config class shrunk to a tiny size (hidden 32, FFN 64, 2 layers per stack, 4 heads, vocabulary 128).
# Families that do not build that way, or that cannot be converted, stay in the list: the coverage
# table (``benchmarks/zoo_coverage.py``) gives each one's reason.

TINY_HIDDEN, TINY_FFN, TINY_LAYERS, TINY_HEADS, TINY_VOCAB = 32, 64, 2, 4, 128
_TINY: dict[str, object] = {
    # widths
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "embedding_size", "word_embed_proj_dim"), 32),
    **dict.fromkeys(
        (
            "intermediate_size",
            "d_ff",
            "n_inner",
            "ffn_dim",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "ffn_hidden_size",
            "shared_expert_intermediate_size",
            "dense_intermediate_size",
        ),
        TINY_FFN,
    ),
    "moe_intermediate_size": TINY_FFN // 2,
    # depth and heads
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "encoder_layers",
            "decoder_layers",
            "num_decoder_layers",
            "num_encoder_layers",
        ),
        TINY_LAYERS,
    ),
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
        ),
        TINY_HEADS,
    ),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads"), 2),
    **dict.fromkeys(("head_dim", "d_kv", "d_head", "kv_channels", "attention_head_size"), 8),
    # vocabulary, positions, special tokens inside it
    "vocab_size": TINY_VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"), 128),
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    # routed experts, for the families that are MoE already
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    "num_experts_per_tok": 2,
    # partial rotary, multi-head latent attention, local attention windows
    "rotary_dim": 4,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "attention_window": 4,
}
_FAMILY_TINY: dict[str, dict[str, object]] = {
    "distilbert": {"hidden_dim": TINY_FFN},  # its hidden_dim is the FFN width
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
}


@dataclass(frozen=True)
class Family:
    """A transformers model family and the head class the zoo builds."""

    name: str  # the model_type
    head: str  # "causal_lm", "seq2seq", "masked_lm"
    class_name: str


def hf_families() -> list[Family]:
    """Every family with a seq2seq, causal-LM or masked-LM head, each once (in that order of preference,
    so encoder-decoders are built whole)."""
    from transformers.models.auto import modeling_auto as auto

    families: dict[str, Family] = {}
    for head, mapping in (
        ("seq2seq", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        ("causal_lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        ("masked_lm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
    ):
        for name, class_name in mapping.items():
            if isinstance(class_name, str):
                families.setdefault(name, Family(name, head, class_name))
    return sorted(families.values(), key=lambda f: f.name)


def tiny_config(family: Family) -> object:
    """The family's config class with every size field it has shrunk, and dropouts 0 (deterministic)."""
    import dataclasses

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[family.name]
    fields = (
        {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    )
    fields |= set(getattr(config_cls, "attribute_map", {}))
    overrides = {key: value for key, value in _TINY.items() if key in fields}
    overrides.update(_FAMILY_TINY.get(family.name, {}))
    for name in fields:
        if name.endswith(("dropout", "pdrop", "dropout_prob", "dropout_rate", "layerdrop")):
            overrides[name] = 0.0
    if family.head == "causal_lm" and "is_decoder" in fields:
        overrides["is_decoder"] = True
    default = config_cls()
    layers = getattr(default, "num_hidden_layers", None)
    for name in fields - set(overrides):  # per-layer lists (layer types): the first and the last layer's
        value = getattr(default, name, None)
        if isinstance(value, list) and layers and len(value) == layers > TINY_LAYERS:
            overrides[name] = [value[0], value[-1]]
    return config_cls(**overrides)


MAX_TINY_PARAMS = 5_000_000  # a shrunk config far above this kept sizes the zoo does not know to shrink


class NotTiny(Exception):
    """The family is not built: composite (multimodal) config, or still large after shrinking."""


def build_family(family: Family, seed: int = 0) -> nn.Module:
    """The family's model from its tiny config. Built on the meta device first, so a config whose sizes
    live where the zoo does not shrink them (sub-configs of multimodal models) is refused, not built."""
    import transformers

    config = tiny_config(family)
    composite = sorted(getattr(config, "sub_configs", {}) or {})
    if composite:
        raise NotTiny(f"composite config ({', '.join(composite)}): not a text-only family")
    model_cls = getattr(transformers, family.class_name)
    with torch.device("meta"):
        params = sum(p.numel() for p in model_cls(config).parameters())
    if params > MAX_TINY_PARAMS:
        raise NotTiny(f"the shrunk config still has {params:,} parameters")
    torch.manual_seed(seed)
    model = model_cls(config)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model.config, "is_encoder_decoder", False):
        generation.decoder_start_token_id = generation.decoder_start_token_id or 0
    return model.eval()


def expected_ffns(model: nn.Module, family: Family) -> int | None:
    """Layers x one FFN per layer, from the config; ``None`` where the config does not say it that simply
    (hybrid and MoE families, where some layers have no dense FFN)."""
    config = model.config
    if any(getattr(config, key, None) for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        return None
    if any(
        getattr(config, key, None) for key in ("layer_types", "layers_block_type", "hybrid_override_pattern")
    ):
        kinds = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)
        if isinstance(kinds, list) and any("mamba" in str(k) or "linear" in str(k) for k in kinds):
            return None
    if family.name == "albert":  # layers share their weights, group by group
        return config.num_hidden_groups * config.inner_group_num
    if family.name == "mobilebert":  # a stack of FFNs in every layer
        return config.num_hidden_layers * config.num_feedforward_networks
    if family.name == "funnel":  # blocks of layers, then a decoder
        return sum(config.block_sizes) + config.num_decoder_layers
    if family.name == "hrm_text":  # a high-level and a low-level stack
        return 2 * config.num_layers_per_stack
    if family.name == "ultrabert":  # its prediction head is a d -> h -> d MLP too
        return config.num_hidden_layers + 1
    if family.head == "seq2seq" or getattr(config, "is_encoder_decoder", False):
        encoder = getattr(config, "encoder_layers", None) or getattr(config, "num_layers", None)
        decoder = getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
        return encoder + decoder if encoder and decoder else None
    return getattr(config, "num_hidden_layers", None)


def family_inputs(model: nn.Module, batch: int, seq: int, *, pad: str | None = None, seed: int = 0) -> dict:
    """Token ids inside the vocabulary (special ids avoided), an attention mask (``pad="right"`` or
    ``"left"`` pads the first sequence's last or first two positions), decoder ids for seq2seq."""
    config = model.config
    vocab = getattr(config, "vocab_size", TINY_VOCAB) or TINY_VOCAB
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad == "right":
        mask[0, -2:] = 0
    elif pad == "left":
        mask[0, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.flip(-1)
    return inputs


@dataclass
class Coverage:
    """What the compiler does with one family: each check is ``"yes"``, ``"n/a"`` or why not."""

    family: str
    head: str
    found: int | None = None
    expected: int | None = None
    rewrites: str = "-"
    moe_exact: str = "-"
    mot_runs: str = "-"
    generate: str = "-"
    reason: str = ""
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        """Why the family is not converted (its first failing check), or ``"converted"``."""
        if self.converted:
            return "converted"
        if self.reason:
            return self.reason
        if self.expected not in (None, self.found):
            return f"found {self.found} FFN sites, the config says {self.expected}"
        return next(c for c in (self.moe_exact, self.mot_runs, self.generate) if c not in ("yes", "n/a"))

    @property
    def converted(self) -> bool:
        return (
            bool(self.found)
            and self.expected in (None, self.found)
            and self.moe_exact == "yes"
            and self.mot_runs == "yes"
            and self.generate in ("yes", "n/a")
        )


MOE_RECIPE = {"strategy": "moe", "num_experts": 4, "top_k": 2, "init": "upcycle"}
MOT_RECIPE = {"strategy": "mot", "num_experts": 4, "group_size": 2, "sizing": "flop", "init": "random"}


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}"


def main_output(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state", "prediction_logits"):
        value = output.get(key) if hasattr(output, "get") else None
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def coverage(family: Family) -> Coverage:
    """Build the family tiny, find its FFNs, check upcycled MoE == dense (fp32, 1e-5), run MoT forward and
    backward on a right-padded batch, and ``generate`` with the MoE model (greedy, equal to dense)."""
    import time
    import warnings

    from mixcompile.compiler import convert, find_sites
    from mixcompile.runtime.blocks import MoTBlock

    row = Coverage(family.name, family.head)
    start = time.perf_counter()
    try:
        try:
            model = build_family(family)
        except NotTiny as exc:
            row.reason = f"not built: {exc}"
            return row
        except Exception as exc:  # noqa: BLE001 - the reason goes into the table
            row.reason = f"does not build from a tiny config ({_why(exc)})"
            return row
        sites = find_sites(model).sites
        row.found, row.expected = len(sites), expected_ffns(model, family)
        row.rewrites = ", ".join(sorted({s.rewrite.method for s in sites if s.rewrite})) or "-"
        stuck = [s for s in sites if s.rewrite is None]
        if not sites:
            row.reason = "no dense FFN found" + _unknown_activations(model)
            return row
        if stuck:
            row.reason = f"{stuck[0].label}: {stuck[0].reason}"
        inputs = family_inputs(model, 2, 6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row.moe_exact = _moe_exact(model, inputs, convert)
            row.mot_runs = _mot_runs(model, convert, MoTBlock)
            row.generate = _generates(model, family, convert)
    finally:
        row.seconds = time.perf_counter() - start
    return row


def _unknown_activations(model: nn.Module) -> str:
    """Name activation-like modules outside mixcompile's vocabulary, the usual reason nothing matched."""
    from mixcompile.compiler.activation_names import module_activation

    def looks_like_one(name: str) -> bool:
        return "act" in name or name.endswith(("lu", "gelu", "swish"))

    names = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if not list(m.children())
            and looks_like_one(type(m).__name__.lower())
            and module_activation(m) is None
        }
    )
    return f" (activations mixcompile does not know: {', '.join(names)})" if names else ""


def _moe_exact(model: nn.Module, inputs: dict, convert: Callable) -> str:
    try:
        moe = convert(model, **MOE_RECIPE).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                main_output(moe(**inputs)), main_output(model(**inputs)), rtol=1e-5, atol=1e-5
            )
    except Exception as exc:  # noqa: BLE001
        return _why(exc)
    return "yes"


def _mot_runs(model: nn.Module, convert: Callable, mot_block: type) -> str:
    try:
        mot = convert(model, **MOT_RECIPE).train()
        output = main_output(mot(**family_inputs(mot, 4, 6, pad="right")))
        output.float().square().mean().backward()
        blocks = [m for m in mot.modules() if isinstance(m, mot_block)]
        if not blocks or any(b.experts.w_in.grad is None for b in blocks):
            return "no gradient reached a MoT block"
    except Exception as exc:  # noqa: BLE001
        return _why(exc)
    return "yes"


def _generates(model: nn.Module, family: Family, convert: Callable) -> str:
    if family.head not in ("causal_lm", "seq2seq"):
        return "n/a"
    try:
        moe = convert(model, **MOE_RECIPE).eval()
        prompt = family_inputs(model, 1, 4)["input_ids"]
        with torch.no_grad():
            expected = model.generate(prompt, max_new_tokens=3, do_sample=False)
            got = moe.generate(prompt, max_new_tokens=3, do_sample=False)
        if not torch.equal(got, expected):
            return "MoE generate differs from dense"
    except Exception as exc:  # noqa: BLE001
        return _why(exc)
    return "yes"


def hand_coverage(entry: ZooEntry) -> Coverage:
    """:func:`coverage` for a hand-written zoo entry (its FFN count is known; MoT runs with the first
    sequence right-padded through :func:`mixcompile.token_mask`)."""
    import time
    import warnings

    import mixcompile as mc
    from mixcompile.compiler import convert, find_sites

    row = Coverage(entry.name, "hand-written", expected=entry.num_ffns)
    start = time.perf_counter()
    model = build(entry.name).eval()
    sites = find_sites(model).sites
    row.found = len(sites)
    row.rewrites = ", ".join(sorted({s.rewrite.method for s in sites if s.rewrite})) or "-"
    inputs = entry.inputs(2, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row.moe_exact = _moe_exact(model, inputs, convert)
        try:
            mot = convert(model, **MOT_RECIPE).train()
            mask = torch.ones(4, 6, dtype=torch.bool)
            mask[0, -2:] = False
            with mc.token_mask(mot, mask):
                main_output(mot(**entry.inputs(4, 6))).float().square().mean().backward()
            row.mot_runs = "yes"
        except Exception as exc:  # noqa: BLE001
            row.mot_runs = _why(exc)
        row.generate = "n/a"
        if entry.causal_lm:
            row.generate = _generates(model, Family(entry.name, "causal_lm", ""), convert)
    row.seconds = time.perf_counter() - start
    return row
