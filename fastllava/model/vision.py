"""The ViT vision tower, CLIP's (CLS token, pre-layernorm, quick-GELU) or SigLIP's (no CLS, no pre-layernorm,
tanh-GELU), run only up to the selected feature layer.

Shape legend: N images, P patch tokens per image (+1 for CLS), C vision width.
Module names mirror Hugging Face's CLIPVisionTransformer / SiglipVisionTransformer so checkpoints map key
for key. Both share the encoder layer; VisionConfig.has_class_token says which embeddings and pre-norm.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import LlavaConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x), elementwise, any shape."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class VisionEmbeddings(nn.Module):
    """The patch embedding (a stride-p convolution: without bias in CLIP, with bias in SigLIP), CLIP's CLS
    token, and learned positions (for CLS and the patches, or the patches only)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cls = cfg.has_class_token
        if cls:
            self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=not cls
        )
        self.position_embedding = nn.Embedding(cfg.num_patches + cls, cfg.hidden_size)

    def forward(self, pixels_N3HW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, P (+ 1), C): CLS first if the tower has one, then the patches in raster
        order."""
        patches_NCP = self.patch_embedding(pixels_N3HW.to(self.patch_embedding.weight.dtype)).flatten(2)
        x_NPC = patches_NCP.transpose(1, 2)
        if hasattr(self, "class_embedding"):
            x_NPC = torch.cat([self.class_embedding.expand(x_NPC.shape[0], 1, -1), x_NPC], dim=1)
        return x_NPC + self.position_embedding.weight


class CLIPAttention(nn.Module):
    """Multi-head self-attention over each image's tokens (no mask), with biases as in CLIP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        c = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x_NPC: torch.Tensor) -> torch.Tensor:
        """(N, P, C) -> (N, P, C)."""
        n, p, c = x_NPC.shape

        def heads(t):
            return t.view(n, p, self.num_heads, c // self.num_heads).transpose(1, 2)

        o_NHPD = F.scaled_dot_product_attention(heads(self.q_proj(x_NPC)), heads(self.k_proj(x_NPC)), heads(self.v_proj(x_NPC)))
        return self.out_proj(o_NHPD.transpose(1, 2).reshape(n, p, c))


class CLIPMLP(nn.Module):
    """fc1 -> the config's GELU (quick, exact or tanh) -> fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, P, C) -> (N, P, C)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """Returns the hidden state of `vision_feature_layer`; the layers after it are not built.

    Their checkpoint weights (and post_layernorm, which feature extraction never uses, and SigLIP's pooling
    head) are carried by the Llava model as plain tensors so an export stays complete. transformers' Llava
    selects `hidden_states[k]` too, which for k = -1 is the last layer's output before post_layernorm.
    """

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        v = cfg.vision
        self.embeddings = VisionEmbeddings(v)
        if v.has_class_token:
            self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # sic: HF's spelling
        self.layers = nn.ModuleList(CLIPEncoderLayer(v) for _ in range(cfg.num_vision_layers_run))
        self.drop_cls = v.has_class_token and cfg.vision_feature_select == "patch"

    def forward(self, pixels_N3HW: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, P, C) features of the selected layer (P includes CLS for cls_patch)."""
        x = self.embeddings(pixels_N3HW)
        if hasattr(self, "pre_layrnorm"):
            x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.drop_cls else x
